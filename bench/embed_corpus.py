#!/usr/bin/env python3
"""Writes the sentences of the embedding benchmark (bench/embed.py): 512 lines of English, half
short search queries (5-15 words), half passages (40-200 words, log-uniform), in a shuffled order, from a
fixed seed and the small grammar below, so the file is the same on every machine and no data is
downloaded.

Every line is at most MAX_TOKENS tokens by all-MiniLM-L6-v2's own tokenizer ([CLS] and [SEP]
included; a passage that would be longer loses words from its end), so no system truncates and
every system embeds exactly the same text.

    bench/.venv/bin/python bench/embed_corpus.py [-o bench/embed_corpus.txt] [--check]

--check regenerates the text and fails when the file differs (the committed file is this
script's output). Needs `tokenizers` (bench/requirements.txt) and the cached tokenizer.json
(scripts/fetch_minilm.sh).
"""

import argparse
import math
import os
import random
import sys
from pathlib import Path

SEED = 20261204
COUNT = 512
MAX_TOKENS = 256
QUERY_WORDS = (5, 15)
PASSAGE_WORDS = (40, 200)
HERE = Path(__file__).resolve().parent
DEFAULT_OUT = HERE / "embed_corpus.txt"
CACHE = Path(os.environ.get("KILN_CACHE") or Path.home() / ".cache" / "kiln") / "minilm"

# Topics: things (nouns), what people do with them (verb phrases, base form), and qualities.
TOPICS = {
    "cooking": (
        ["sourdough bread", "tomato soup", "the oven", "a cast iron pan", "fresh pasta", "the sauce",
         "brown rice", "a chocolate cake", "the dough", "roasted vegetables", "chicken stock", "the recipe"],
        ["bake", "season", "reheat", "store", "freeze", "thicken", "slice", "marinate", "prepare", "cook"],
        ["crispy", "homemade", "quick", "healthy", "spicy", "tender", "simple", "traditional"],
    ),
    "travel": (
        ["the train station", "a cheap flight", "the old harbour", "a mountain village", "the museum",
         "a hotel room", "the border crossing", "the night bus", "a hiking trail", "the city centre"],
        ["book", "visit", "reach", "explore", "cancel", "photograph", "cross", "find", "plan", "avoid"],
        ["crowded", "quiet", "historic", "remote", "affordable", "scenic", "popular", "coastal"],
    ),
    "computers": (
        ["the laptop", "a wireless router", "the hard drive", "a password manager", "the browser",
         "an old printer", "the operating system", "a backup", "the keyboard", "a database server"],
        ["reset", "update", "install", "configure", "restart", "replace", "encrypt", "repair", "clean", "test"],
        ["slow", "secure", "outdated", "reliable", "noisy", "portable", "expensive", "broken"],
    ),
    "health": (
        ["a headache", "the knee", "good sleep", "vitamin D", "a daily walk", "the immune system",
         "back pain", "a balanced diet", "blood pressure", "seasonal allergies"],
        ["treat", "improve", "prevent", "measure", "reduce", "manage", "support", "recognize", "ease", "track"],
        ["chronic", "mild", "regular", "healthy", "painful", "common", "gentle", "effective"],
    ),
    "money": (
        ["a savings account", "the mortgage", "interest rates", "the monthly budget", "a small loan",
         "the stock market", "an index fund", "the tax return", "a credit card", "retirement savings"],
        ["open", "compare", "pay off", "invest in", "calculate", "lower", "refinance", "file", "review", "split"],
        ["fixed", "variable", "high", "low", "annual", "safe", "risky", "long term"],
    ),
    "nature": (
        ["the forest", "a river delta", "migrating birds", "the glacier", "wild bees", "the coral reef",
         "an oak tree", "the tide", "a thunderstorm", "the desert"],
        ["protect", "observe", "study", "restore", "follow", "measure", "map", "count", "describe", "visit"],
        ["ancient", "fragile", "vast", "dense", "shallow", "endangered", "green", "frozen"],
    ),
    "history": (
        ["the old castle", "a medieval market", "the treaty", "an ancient road", "the royal archive",
         "a stone bridge", "the printing press", "the city walls", "a trading company", "the cathedral"],
        ["build", "defend", "rebuild", "document", "excavate", "restore", "discover", "rule", "study", "sign"],
        ["medieval", "famous", "ruined", "roman", "forgotten", "powerful", "early", "colonial"],
    ),
    "sports": (
        ["the marathon", "a tennis racket", "the final match", "the swimming pool", "a training plan",
         "the football season", "a climbing wall", "the referee", "running shoes", "the league table"],
        ["win", "train for", "watch", "join", "coach", "warm up for", "schedule", "lose", "finish", "organize"],
        ["tough", "local", "weekly", "professional", "amateur", "exciting", "long", "indoor"],
    ),
}
PEOPLE = ["the team", "my neighbour", "a local farmer", "the engineers", "our teacher", "the council",
          "visitors", "the researchers", "many families", "the author", "a young student", "the owners"]
PAST = {"bake": "baked", "season": "seasoned", "reheat": "reheated", "store": "stored", "freeze": "froze",
        "thicken": "thickened", "slice": "sliced", "marinate": "marinated", "prepare": "prepared",
        "cook": "cooked", "book": "booked", "visit": "visited", "reach": "reached", "explore": "explored",
        "cancel": "cancelled", "photograph": "photographed", "cross": "crossed", "find": "found",
        "plan": "planned", "avoid": "avoided", "reset": "reset", "update": "updated", "install": "installed",
        "configure": "configured", "restart": "restarted", "replace": "replaced", "encrypt": "encrypted",
        "repair": "repaired", "clean": "cleaned", "test": "tested", "treat": "treated", "improve": "improved",
        "prevent": "prevented", "measure": "measured", "reduce": "reduced", "manage": "managed",
        "support": "supported", "recognize": "recognized", "ease": "eased", "track": "tracked",
        "open": "opened", "compare": "compared", "pay off": "paid off", "invest in": "invested in",
        "calculate": "calculated", "lower": "lowered", "refinance": "refinanced", "file": "filed",
        "review": "reviewed", "split": "split", "protect": "protected", "observe": "observed",
        "study": "studied", "restore": "restored", "follow": "followed", "map": "mapped", "count": "counted",
        "describe": "described", "build": "built", "defend": "defended", "rebuild": "rebuilt",
        "document": "documented", "excavate": "excavated", "discover": "discovered", "rule": "ruled",
        "sign": "signed", "win": "won", "train for": "trained for", "watch": "watched", "join": "joined",
        "coach": "coached", "warm up for": "warmed up for", "schedule": "scheduled", "lose": "lost",
        "finish": "finished", "organize": "organized"}
TIMES = ["last spring", "every morning", "after the storm", "during the winter", "in the early years",
         "before the holidays", "over the weekend", "at the end of the season", "for several months",
         "in recent decades", "two days later", "since the new rules came in"]
REASONS = ["because the costs kept rising", "so that everyone could take part", "although the weather was poor",
           "while the work was still going on", "after a long discussion", "without much help",
           "to save time and money", "as the old method no longer worked", "despite several delays",
           "once the results were clear"]
OPENERS = ["In short,", "At first,", "Later,", "Even so,", "For this reason,", "In the end,", "Meanwhile,",
           "According to the report,", "Not surprisingly,", "Over time,"]
PLACES = ["near the coast", "in the north", "downtown", "at home", "in a small town", "near me", "online",
          "in winter", "on a budget", "for beginners", "without tools", "in one day"]


def query(rng):
    """A search query of QUERY_WORDS words: a question or keyword-style request on one topic."""
    things, verbs, quals = TOPICS[rng.choice(sorted(TOPICS))]
    t, v, q = rng.choice(things), rng.choice(verbs), rng.choice(quals)
    bare = t.removeprefix("the ").removeprefix("a ").removeprefix("an ")
    forms = [
        f"how do I {v} {t} {rng.choice(PLACES)}",
        f"what is the best way to {v} {t}",
        f"{q} {bare} {rng.choice(PLACES)}",
        f"why is {t} so {q} {rng.choice(TIMES)}",
        f"can you {v} {t} {rng.choice(PLACES)} and is it worth it",
        f"tips to {v} {t} when it is {q}",
        f"{bare} vs {rng.choice(things).removeprefix('the ')} which one is more {q}",
        f"where can I {v} {t} {rng.choice(PLACES)}",
    ]
    lo, hi = QUERY_WORDS
    words = rng.choice(forms).split()
    while len(words) > hi:
        words = rng.choice(forms).split()
    while len(words) < lo:
        words += rng.choice(PLACES).split()
    text = " ".join(words[:hi])
    return text[0].upper() + text[1:] + ("?" if rng.random() < 0.5 else "")


def plural(thing):
    last = thing.split()[-1]
    singular = ("bus", "news")
    return not thing.startswith(("a ", "an ")) and last.endswith("s") and not last.endswith(("ss", *singular))


def was(thing):
    return "were" if plural(thing) else "was"


def it(thing):
    return "them" if plural(thing) else "it"


def clause(rng, things, verbs, quals):
    who, v, t = rng.choice(PEOPLE), rng.choice(verbs), rng.choice(things)
    forms = [
        f"{who} {PAST[v]} {t} {rng.choice(TIMES)}",
        f"{who} {PAST[v]} {t} {rng.choice(REASONS)}",
        f"{t} {was(t)} {rng.choice(quals)} and {who} {PAST[v]} {it(t)} {rng.choice(TIMES)}",
        f"it is {rng.choice(quals)} to {v} {t} {rng.choice(PLACES)}",
        f"most people {v} {t} {rng.choice(TIMES)}, {rng.choice(REASONS)}",
        f"{who} said that {t} looked {rng.choice(quals)} {rng.choice(TIMES)}",
    ]
    return rng.choice(forms)


def passage(rng):
    """A paragraph of PASSAGE_WORDS words on one or two topics."""
    names = sorted(TOPICS)
    topics = [TOPICS[rng.choice(names)] for _ in range(2)]
    # Log-uniform: short paragraphs are more common than long ones (mean ≈ 100 words).
    lo, hi = PASSAGE_WORDS
    target = round(math.exp(rng.uniform(math.log(lo), math.log(hi))))
    sentences, words = [], 0
    while words < target:  # whole sentences, the last one may pass the target
        things, verbs, quals = topics[0] if rng.random() < 0.75 else topics[1]
        s = clause(rng, things, verbs, quals)
        if rng.random() < 0.4:
            s = f"{s}, and {clause(rng, things, verbs, quals)}"
        if sentences and rng.random() < 0.3:
            s = f"{rng.choice(OPENERS)} {s}"
        s = s[0].upper() + s[1:] + "."
        sentences.append(s)
        words += len(s.split())
    if words > PASSAGE_WORDS[1] and words - len(sentences[-1].split()) >= PASSAGE_WORDS[0]:
        sentences.pop()
    return " ".join(sentences)


def fit(text, tokenizer):
    """`text` cut word by word from its end until it is at most MAX_TOKENS tokens."""
    words = text.split()
    while len(tokenizer.encode(" ".join(words)).ids) > MAX_TOKENS:
        words.pop()
    out = " ".join(words).rstrip(",;:")
    return out if out.endswith((".", "?")) else out + "."


def corpus(tokenizer):
    rng = random.Random(SEED)
    lines = [query(rng) for _ in range(COUNT // 2)] + [passage(rng) for _ in range(COUNT - COUNT // 2)]
    lines = [fit(p, tokenizer) if i >= COUNT // 2 else p for i, p in enumerate(lines)]
    rng.shuffle(lines)
    return "".join(line + "\n" for line in lines)


def tokenizer():
    from tokenizers import Tokenizer

    path = CACHE / "tokenizer.json"
    if not path.is_file():
        sys.exit(f"embed_corpus.py: {path} does not exist; run scripts/fetch_minilm.sh first")
    t = Tokenizer.from_file(str(path))
    t.no_truncation()
    t.no_padding()
    return t


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("-o", "--out", type=Path, default=DEFAULT_OUT)
    ap.add_argument("--check", action="store_true", help="fail when the file is not this script's output")
    args = ap.parse_args()
    text = corpus(tokenizer())
    if args.check:
        if not args.out.is_file() or args.out.read_text() != text:
            sys.exit(f"embed_corpus.py: {args.out} is not the output of this script; rerun it without --check")
        print(f"{args.out}: up to date")
        return
    args.out.write_text(text)
    print(f"wrote {args.out} ({len(text.encode())} bytes, {text.count(chr(10))} lines)")


if __name__ == "__main__":
    main()
