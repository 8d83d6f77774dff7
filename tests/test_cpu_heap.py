"""Heap retention (camelid/cpu/heap.py): after `retain()`, a workload that frees and takes back
the same buffers takes its pages from the process's heap instead of faulting them back from the
kernel; `prepare_for_training` applies it on a CPU, and not under CAMELID_CPU_FAST=0. Each check
runs in a fresh interpreter: the setting lasts for the process."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from camelid.cpu import heap

pytestmark = pytest.mark.skipif(not heap.supported(), reason="heap retention needs glibc")

WORKLOAD = """
import json, resource, sys, torch
from camelid.cpu import heap
retained = heap.retain() if sys.argv[1] == "retain" else False
def work():  # ~560 MB of 4-16 MB buffers, touched, then freed: a mini-batch's activations
    ts = [torch.ones(1 << (20 + i % 3)) for i in range(60)]
    del ts
work()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
work(); work()
print(json.dumps({"retained": retained, "faults": resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before}))
"""


def _run(code: str, *args: str, env: dict | None = None) -> dict:
    out = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, check=True,
                         env={**os.environ, **(env or {})})
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_retained_buffers_are_not_faulted_back():
    default, retained = _run(WORKLOAD, "default"), _run(WORKLOAD, "retain")
    assert retained["retained"] and not default["retained"]
    # glibc's defaults give the ~1 GB of the two passes back and fault it in again (~270k pages)
    assert default["faults"] > 50_000
    assert retained["faults"] < default["faults"] / 10


PREPARE = """
import json, os
from transformers import LlamaConfig, LlamaForCausalLM
from camelid import cpu
from camelid.cpu import heap
model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                     num_attention_heads=2))
seen = {}
for switch in ("0", "1"):  # the switch is read at each call
    os.environ["CAMELID_CPU_FAST"] = switch
    cpu.prepare_for_training(model)
    seen[switch] = {"state": list(heap._state), "paths": cpu.active_fast_paths()}
print(json.dumps(seen))
"""


def test_prepare_for_training_retains_only_with_the_switch_on():
    seen = _run(PREPARE)
    assert seen["0"]["state"] == [] and seen["0"]["paths"] == []
    assert seen["1"]["state"] == [True] and "heap-retention" in seen["1"]["paths"]
