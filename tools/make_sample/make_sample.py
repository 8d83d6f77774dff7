"""Generate the bundled sample dump (a build tool; the package ships its output, not this code).

    python tools/make_sample/make_sample.py [--out DIR] [--seed N]     (or: make sample)

Writes Posts.xml and Votes.xml in the real Stack Exchange dump format (UTF-8 BOM, HTML bodies
XML-escaped, newlines as `&#xA;`, `<a><b>` tags, a few tag-wiki rows) to camelid/data/sample/,
which `camelid data stackexchange` reads by default.
The output is a pure function of the seed: rerunning it gives identical bytes (a test checks).

Questions come from the tables in sample_programming.py and sample_home.py. Every question gets
2-6 answers, each written in one of six styles whose votes follow their quality:

    expert   correct, complete, polite: explanation, code or steps, caveat, link   many up-votes
    concise  correct and short                                                     up-votes
    partial  correct but bare (code or one line, no why)                           a few
    vague    hedging, no concrete fact                                             ~0
    wrong    a plausible mistake stated confidently, often long                    down-votes
    rude     scolds the asker, then vague or wrong                                 down-votes

Length is deliberately not the signal: wrong and rude answers are often padded, concise ones are
short, so "the longer answer wins" is a weak baseline that a reward model has to beat.
"""

from __future__ import annotations

import argparse
import random
from pathlib import Path

import sample_home as home  # the tables beside this file (the script's folder is on sys.path)
import sample_programming as prog

SAMPLE_DIR = Path(__file__).resolve().parents[2] / "camelid" / "data" / "sample"
"""Where the package keeps the sample (camelid.data.SAMPLE_DIR of this checkout)."""
SEED = 20240501
STYLES = ("expert", "concise", "partial", "vague", "wrong", "rude")
VOTES = {  # style -> (up range, down range)
    "expert": ((8, 35), (0, 2)), "concise": ((4, 16), (0, 1)), "partial": ((2, 6), (0, 2)),
    "vague": ((0, 1), (0, 3)), "wrong": ((0, 1), (1, 6)), "rude": ((0, 1), (2, 9)),
}
POLITE_OPEN = ["Good question, this trips up a lot of people.", "Happy to help with this one.", "", "", ""]
POLITE_CLOSE = ["Hope this helps!", "Good luck!", "", "", ""]
VAGUE = [
    "It really depends on a lot of factors, honestly.", "There are many different ways to do this and everyone has their own opinion.",
    "I would just experiment until something works for you.", "Maybe look it up online, there are plenty of tutorials.",
    "I had something similar once and it sort of sorted itself out.", "Hard to say without more details.",
    "Some people swear by one approach, some by another.", "You might want to try a few things and see.",
]
CONFIDENT = [
    "I have been doing this for fifteen years and this is the only way that works.", "Trust me, the documentation is wrong about this.",
    "Everyone who says otherwise just hasn't tried it properly.", "This is how it has always been done.",
    "I read this on a forum years ago and never had a problem.", "Anything else is overcomplicating it.",
]
RUDE_OPEN = [
    "Did you even try searching before asking?", "This has been asked a thousand times.", "Seriously? Read the manual.",
    "Not sure why people keep posting this.", "This is a really basic question.",
]
RUDE_CLOSE = ["Next time do your own homework.", "Voting to close.", "Please put in some effort first.", ""]
CONTEXT = {
    "programming": ["I'm on Ubuntu 22.04.", "This is for a small side project.", "I'm fairly new to this.", "Using the latest version."],
    "cooking": ["I'm cooking for a family dinner.", "I'm a beginner cook.", "I follow recipes from a cookbook.", "My kitchen is fairly basic."],
    "gardening": ["I'm in a temperate climate with cold winters.", "This is my first vegetable garden.", "I garden in raised beds.", "I live in a fairly dry area."],
}


def esc(text: str) -> str:
    """HTML-escape text the way the dumps store bodies (`&quot;` included)."""
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;").replace('"', "&quot;")


def xml_attr(text: str) -> str:
    """Escape an attribute value as the dumps do: entities for markup, `&#xA;` for newlines."""
    return esc(text).replace("\r", "&#xD;").replace("\n", "&#xA;")


def _spec(topic, tags, title, ask, answer, detail="", code=None, lang="", steps=(), caveat="", link=None,
          wrong="", wrong_code=None) -> dict:
    return {"topic": topic, "tags": tags, "title": title, "ask": ask, "answer": answer, "detail": detail,
            "code": code, "lang": lang, "steps": list(steps), "caveat": caveat, "link": link, "wrong": wrong,
            "wrong_code": wrong_code}


def questions() -> list[dict]:
    """Every question of the sample, as plain specs (facts for the good and the wrong answers)."""
    out = []
    for op, (what, ask, by_lang) in prog.OPS.items():
        for lang, (code, detail, wcode, wrong) in by_lang.items():
            name, url, docs = prog.LANGS[lang]
            out.append(_spec("programming", [lang, op], f"How do I {what} in {name}?", ask,
                             f"In {name}:", detail, code, lang, (), "", (url, docs), wrong, wcode))
    for tags, title, ask, lang, answer, detail, code, steps, caveat, link, wrong, wcode in prog.ITEMS:
        out.append(_spec("programming", tags, title, ask, answer, detail, code, lang, steps, caveat, link, wrong, wcode))
    for food, (temp, rest, wrong) in home.MEATS.items():
        out.append(_spec("cooking", ["food-safety", "meat"], f"What internal temperature is safe for {food}?",
                         "I never know when it is done and I don't want to make anyone sick.",
                         f"Cook it to {temp}{rest}. Measure with an instant-read thermometer.",
                         "Colour and clear juices are not reliable signs of doneness.", None, "",
                         ["Insert the probe into the thickest part, away from bone", "Wait for the reading to settle"],
                         "Calibrate the thermometer in ice water (it should read 32 °F / 0 °C).", home.FSIS,
                         f"It is done at {wrong}."))
    for item, (ok, how, wrong) in home.FREEZE.items():
        out.append(_spec("cooking", ["freezing", "storage"], f"Can you freeze {item}?", "I have too much and don't want to waste it.",
                         how, "Freeze it as fresh as possible and label it with the date.", caveat="Most frozen food keeps best quality for 2–3 months.",
                         link=("https://www.fsis.usda.gov/food-safety/safe-food-handling-and-preparation/food-safety-basics/freezing-and-food-safety", "USDA: freezing and food safety"),
                         wrong=wrong))
    for q, (right, wrong) in home.CONVERSIONS.items():
        out.append(_spec("cooking", ["measurements", "conversion"], f"How many {q}?", "My recipe mixes units and I want to get it right.",
                         right, "For baking, weighing ingredients is more accurate than measuring by volume.", wrong=wrong,
                         link=("https://www.nist.gov/pml/owm/approximate-conversions-us-customary-measures-metric", "NIST conversion tables")))
    for item, (sub, wrong) in home.SUBSTITUTES.items():
        out.append(_spec("cooking", ["substitutions", "baking"], f"What can I substitute for {item}?", "I'm halfway through a recipe and don't have any.",
                         f"Use {sub}", "It does the same job in the recipe.", caveat="Texture can differ a little, so try it on a small batch first.",
                         wrong=f"Just use {wrong}"))
    for tags, title, ask, answer, detail, steps, caveat, link, wrong in home.COOKING:
        out.append(_spec("cooking", tags, title, ask, answer, detail, None, "", steps, caveat, link, wrong))
    for plant, (ph, sun, when, water, wph, wsun, wwhen, wwater) in home.PLANTS.items():
        link = ("https://extension.umn.edu/find-plants", "your local extension service")
        for kind, title, right, wrong in (
            ("soil", f"What soil pH do {plant} need?", ph, wph), ("sun", f"How much sun do {plant} need?", sun, wsun),
            ("planting", f"When should I plant {plant}?", when, wwhen), ("watering", f"How often should I water {plant}?", water, wwater),
        ):
            out.append(_spec("gardening", [plant.replace(" ", "-"), kind], title, f"I want to grow {plant} this year.",
                             f"{plant.capitalize()} do best with {right}.", "Getting this right matters more than fertiliser.",
                             caveat="Local conditions vary, so check with a soil test or your local extension service.",
                             link=link, wrong=f"{plant.capitalize()} need {wrong}."))
    for tags, title, ask, answer, detail, steps, caveat, link, wrong in home.GARDENING:
        out.append(_spec("gardening", tags, title, ask, answer, detail, None, "", steps, caveat, link, wrong))
    return out


def _code(code: str, lang: str) -> str:
    cls = f' class="lang-{lang}"' if lang else ""
    return f"<pre><code{cls}>{esc(code)}\n</code></pre>"


def _p(text: str) -> str:
    return f"<p>{esc(text)}</p>" if text else ""


def render(style: str, q: dict, rng: random.Random) -> str:
    """The HTML body of one answer in `style` for question spec `q`."""
    parts: list[str] = []
    if style == "expert":
        parts += [_p(rng.choice(POLITE_OPEN)), _p(f"{q['answer']} {q['detail']}".strip())]
        if q["code"]:
            parts.append(_code(q["code"], q["lang"]))
        if q["steps"]:
            items = "".join(f"<li>{esc(s)}</li>" for s in q["steps"])
            parts.append(f"<p>Step by step:</p>\n<ol>\n{items}\n</ol>")
        if q["caveat"]:
            parts.append(f"<p><strong>Note:</strong> {esc(q['caveat'])}</p>")
        if q["link"]:
            parts.append(f'<p>See <a href="{q["link"][0]}">{esc(q["link"][1])}</a> for the details.</p>')
        parts.append(_p(rng.choice(POLITE_CLOSE)))
    elif style == "concise":
        parts.append(_p(q["answer"] if q["code"] else f"{q['answer']} {q['detail']}".strip()))
        if q["code"]:
            parts.append(_code(q["code"], q["lang"]))
    elif style == "partial":
        if q["code"]:
            parts += [_p(rng.choice(["Try this:", "This works:", ""])), _code(q["code"], "")]
        else:
            parts.append(_p(q["answer"]))
    elif style == "vague":
        parts.append(_p(" ".join(rng.sample(VAGUE, rng.randint(2, 4)))))
    elif style == "wrong":
        parts.append(_p(q["wrong"] or "That cannot be done."))
        if q["wrong_code"]:
            parts.append(_code(q["wrong_code"], q["lang"] if rng.random() < 0.5 else ""))
        parts.append(_p(" ".join(rng.sample(CONFIDENT, rng.randint(1, 3)))))
    else:  # rude
        parts.append(_p(rng.choice(RUDE_OPEN)))
        parts.append(_p(q["wrong"] if q["wrong"] and rng.random() < 0.5 else " ".join(rng.sample(VAGUE, 2))))
        parts.append(_p(rng.choice(RUDE_CLOSE)))
    return "\n".join(p for p in parts if p) + "\n"


def question_body(q: dict, rng: random.Random) -> str:
    parts = [_p(q["ask"])]
    if q["wrong_code"] and rng.random() < 0.4:
        parts += [_p("I tried this, but it does not work:"), _code(q["wrong_code"], "")]
    parts.append(_p(f'{rng.choice(CONTEXT[q["topic"]])} {rng.choice(["Thanks!", "Any help appreciated.", ""])}'.strip()))
    return "\n".join(parts) + "\n"


def _date(rng: random.Random, start: int, spread_days: int) -> tuple[int, str]:
    """(minute, dump-style timestamp) within `spread_days` after minute `start` (since 2019-01-01)."""
    import datetime as dt

    minute = start + rng.randint(5, spread_days * 1440)
    t = dt.datetime(2019, 1, 1) + dt.timedelta(minutes=minute, milliseconds=rng.randint(0, 59999))
    return minute, t.strftime("%Y-%m-%dT%H:%M:%S.") + f"{t.microsecond // 1000:03d}"


def _row(attrs: dict) -> str:
    return "  <row " + " ".join(f'{k}="{xml_attr(str(v))}"' for k, v in attrs.items() if v is not None) + " />"


def _answer_styles(rng: random.Random) -> list[str]:
    """2-6 styles; always at least one good and one poor answer, so every question has a pair."""
    n = rng.choices([2, 3, 4, 5, 6], weights=[30, 30, 20, 12, 8])[0]
    styles = [rng.choice(["expert", "concise"]), rng.choice(["vague", "wrong", "rude"])]
    styles += rng.choices(STYLES, weights=[3, 3, 3, 2, 3, 1], k=n - 2)
    rng.shuffle(styles)
    return styles


def build(seed: int = SEED) -> tuple[list[str], list[str], dict[str, int]]:
    """(Posts.xml rows, Votes.xml rows, counts) for the whole sample."""
    rng = random.Random(seed)
    specs = questions()
    rng.shuffle(specs)
    posts, votes, post_id = [], [], 0
    counts = {"questions": 0, "answers": 0, "accepted": 0}

    def vote(pid: int, kind: int, day: str) -> None:
        votes.append(_row({"Id": len(votes) + 1, "PostId": pid, "VoteTypeId": kind, "CreationDate": day[:10] + "T00:00:00.000"}))

    for n, q in enumerate(specs):
        qid = post_id = post_id + 1 + rng.randint(0, 2)  # dumps have gaps where posts were deleted
        qmin, qdate = _date(rng, n * 1095 * 1440 // len(specs), 3)
        styles = _answer_styles(rng)
        answers = []
        for style in styles:
            post_id += 1 + rng.randint(0, 1)
            _, adate = _date(rng, qmin, 30)
            (ulo, uhi), (dlo, dhi) = VOTES[style]
            answers.append({"id": post_id, "style": style, "date": adate, "up": rng.randint(ulo, uhi),
                            "down": rng.randint(dlo, dhi), "body": render(style, q, rng)})
        good = [a for a in answers if a["style"] in ("expert", "concise", "partial")]
        accepted = None
        if good and rng.random() < 0.7:  # askers mostly accept the most up-voted helpful answer
            accepted = max(good, key=lambda a: a["up"])["id"] if rng.random() < 0.9 else rng.choice(good)["id"]
        qup, qdown = rng.randint(0, 25), rng.randint(0, 2)
        posts.append(_row({
            "Id": qid, "PostTypeId": 1, "AcceptedAnswerId": accepted, "CreationDate": qdate, "Score": qup - qdown,
            "ViewCount": rng.randint(20, 5000), "Body": question_body(q, rng), "OwnerUserId": rng.randint(2, 4000),
            "LastActivityDate": max(a["date"] for a in answers), "Title": q["title"],
            "Tags": "".join(f"<{t}>" for t in [q["topic"], *q["tags"]]), "AnswerCount": len(answers),
            "CommentCount": rng.randint(0, 4), "ContentLicense": "CC BY-SA 4.0",
        }))
        for _ in range(qup):
            vote(qid, 2, qdate)
        for _ in range(qdown):
            vote(qid, 3, qdate)
        for a in answers:
            posts.append(_row({
                "Id": a["id"], "PostTypeId": 2, "ParentId": qid, "CreationDate": a["date"], "Score": a["up"] - a["down"],
                "Body": a["body"], "OwnerUserId": rng.randint(2, 4000), "LastActivityDate": a["date"],
                "CommentCount": rng.randint(0, 3), "ContentLicense": "CC BY-SA 4.0",
            }))
            for kind, k in ((2, a["up"]), (3, a["down"]), (1, int(a["id"] == accepted))):
                for _ in range(k):
                    vote(a["id"], kind, a["date"])
        counts["questions"] += 1
        counts["answers"] += len(answers)
        counts["accepted"] += accepted is not None
    for topic in CONTEXT:  # tag wiki excerpt + wiki (PostTypeId 4 and 5), as real dumps have
        for kind in (4, 5):
            post_id += 1
            posts.append(_row({"Id": post_id, "PostTypeId": kind, "CreationDate": "2019-01-01T00:00:00.000", "Score": 0,
                               "Body": _p(f"Questions about {topic}.") + "\n", "OwnerUserId": -1,
                               "LastActivityDate": "2019-01-01T00:00:00.000", "CommentCount": 0,
                               "ContentLicense": "CC BY-SA 4.0"}))
    return posts, votes, counts


def _xml(root: str, rows: list[str]) -> bytes:
    text = '<?xml version="1.0" encoding="utf-8"?>\n' + f"<{root}>\n" + "\n".join(rows) + f"\n</{root}>\n"
    return b"\xef\xbb\xbf" + text.replace("\n", "\r\n").encode("utf-8")


def generate(out: str | Path | None = None, seed: int = SEED) -> dict[str, int]:
    """Write Posts.xml and Votes.xml into `out` (default: the packaged camelid/data/sample/)."""
    out = Path(out) if out is not None else SAMPLE_DIR
    out.mkdir(parents=True, exist_ok=True)
    posts, votes, counts = build(seed)
    for name, root, rows in (("Posts.xml", "posts", posts), ("Votes.xml", "votes", votes)):
        tmp = out / f".{name}.tmp"
        tmp.write_bytes(_xml(root, rows))
        tmp.replace(out / name)
    counts["votes"] = len(votes)
    return counts


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Regenerate the bundled sample Stack Exchange dump.")
    ap.add_argument("--out", default=None, help="output folder (default: camelid/data/sample)")
    ap.add_argument("--seed", type=int, default=SEED)
    args = ap.parse_args(argv)
    counts = generate(args.out, args.seed)
    print(", ".join(f"{v} {k}" for k, v in counts.items()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
