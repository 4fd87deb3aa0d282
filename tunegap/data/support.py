"""The shipped "support tickets" task: a fictional company's house style, learnable on a 2-core CPU.

Lumora is a made-up software company. Tickets name a customer and a product; replies follow a
rigid house style that a base model does not produce by itself, so fine-tuning gains are
measurable with string checks rather than a judge model:

    Hi {Name},
    Sorry {empathy about the product/issue}.
    1. {step}
    2. {step}
    Reply if that doesn't fix it.
    — The Lumora Support Team

About 15% of tickets are out of scope (legal, medical, financial advice, competitor products,
homework, opinions) and get a fixed refusal that still greets and signs off. Everything here
is deterministic for a seed, and examples stay short (~100 SmolLM2 tokens, default system
prompt included) because training runs on small CPUs.

The module also ships small fixed sets for later analyses: `general_prompts` (forgetting/KL),
`general_questions` (easy QA a 135M instruct model gets right) and `fictional_facts` (knowledge
injection).
"""

from __future__ import annotations

import json
import random
import re
from pathlib import Path
from typing import Any, Sequence

from ..io import atomic_write_text

__all__ = [
    "COMPANY", "PRODUCTS", "NAMES", "ISSUES", "OUT_OF_SCOPE", "SIGN_OFF", "CLOSING_LINE",
    "REFUSAL_LINE", "OUT_OF_SCOPE_FRACTION",
    "generate_support", "support_validation", "write_support", "reference_reply", "score_reply", "aggregate_scores",
    "products_mentioned", "general_prompts", "general_questions", "answer_matches", "fictional_facts",
]

COMPANY = "Lumora"
PRODUCTS: tuple[str, ...] = (
    "Lumora Vault", "Lumora Sync", "Lumora Mail", "Lumora Notes",
    "Lumora Meet", "Lumora Keys", "Lumora Photos", "Lumora Tasks",
)
NAMES: tuple[str, ...] = (
    "Maya", "Liam", "Sofia", "Noah", "Aisha", "Mateo", "Priya", "Ethan", "Chloe", "Omar",
    "Hana", "Lucas", "Zara", "Felix", "Amara", "Diego", "Ingrid", "Kenji", "Leila", "Marco",
    "Nadia", "Oscar", "Rosa", "Samir", "Tara", "Viktor", "Yuki", "Elena", "Jonas", "Mei",
    "Arjun", "Freya", "Hugo", "Isla", "Kofi", "Lena", "Nico", "Olga", "Ravi", "Sven",
)
DEVICES: tuple[str, ...] = ("Mac", "Windows PC", "iPhone", "Android phone", "iPad", "Linux laptop")

SIGN_OFF = "— The Lumora Support Team"
CLOSING_LINE = "Reply if that doesn't fix it."
REFUSAL_LINE = "Thanks for your message, but I can only help with questions about Lumora products."
OUT_OF_SCOPE_FRACTION = 0.15

# issue key -> (ticket phrasings, empathy line, step 1, step 2). Slots: {product} {device} {code}.
ISSUES: dict[str, tuple[tuple[str, ...], str, str, str]] = {
    "login": (("I can't sign in to {product} on my {device}.",
               "{product} won't let me log in on my {device}."),
              "Sorry you can't sign in to {product}.",
              "Reset your password from the sign-in screen.", "Sign in again on your {device}."),
    "crash": (("{product} crashes as soon as I open it on my {device}.",
               "{product} keeps closing by itself on my {device}."),
              "Sorry {product} keeps crashing.",
              "Update {product} to the latest version.", "Restart your {device}."),
    "error_code": (("{product} shows error {code} when I save.",
                    "I keep getting error {code} in {product}."),
                   "Sorry you're seeing error {code} in {product}.",
                   "Sign out of {product} and back in.", "Clear the app cache in Settings."),
    "slow": (("{product} has become really slow on my {device}.",
              "{product} takes ages to load on my {device}."),
             "Sorry {product} is running slowly.",
             "Close other apps on your {device}.", "Turn off Background Refresh in {product}."),
    "sync": (("My changes in {product} don't show up on my other devices.",
              "{product} stopped syncing between my {device} and my laptop."),
             "Sorry your changes in {product} aren't syncing.",
             "Check that Sync is on in Settings.", "Pull down to refresh on each device."),
    "notifications": (("I stopped getting notifications from {product}.",
                       "{product} doesn't send me alerts on my {device} anymore."),
                      "Sorry {product} notifications stopped.",
                      "Allow notifications for {product} on your {device}.", "Turn off Focus mode."),
    "billing": (("I was charged twice for {product} this month.",
                 "My card shows two charges for {product}."),
                "Sorry you were charged twice for {product}.",
                "Open Billing in your Lumora account.", "Choose Refund next to the extra charge."),
    "install": (("{product} won't install on my {device}.",
                 "The {product} installer fails on my {device}."),
                "Sorry {product} won't install.",
                "Free up at least 2 GB of space.", "Download the installer again."),
    "export": (("I can't export my data from {product}.",
                "Exporting from {product} fails every time."),
               "Sorry exporting from {product} isn't working.",
               "Go to Settings > Export in {product}.", "Pick a shorter date range and try again."),
    "locked": (("My {product} account is locked after too many attempts.",
                "{product} says my account is locked."),
               "Sorry your {product} account is locked.",
               "Wait 30 minutes for the lock to clear.", "Reset your password from the sign-in screen."),
}

# out-of-scope category -> questions. Some tickets also mention a product, so refusing needs
# reading the request, not just spotting a missing product name.
OUT_OF_SCOPE: dict[str, tuple[str, ...]] = {
    "legal": ("Can I sue my landlord for keeping my deposit?",
              "Is it legal to record a phone call without saying so?",
              "A tree fell on my car. Who has to pay?"),
    "medical": ("How much ibuprofen is safe for a headache?",
                "I've had a sore throat for a week. Is it serious?",
                "Can I take allergy pills with coffee?"),
    "financial": ("Should I move my savings into bitcoin?",
                  "Is now a good time to buy Tesla stock?",
                  "Should I pay off my loan or invest?"),
    "competitor": ("How do I share a folder in Dropbox?",
                   "Google Drive says my storage is full. What do I do?",
                   "How do I mute everyone in a Zoom call?"),
    "homework": ("Can you write my essay on the French Revolution?",
                 "Please solve my homework: 3x + 7 = 22.",
                 "Write a poem about autumn for my English class."),
    "opinion": ("Which political party should I vote for?",
                "What is your favourite movie?",
                "Does pineapple belong on pizza?"),
}

# How a customer introduces themselves; the name must be in the ticket to greet by it.
_NAME_FRAMES: tuple[str, ...] = ("Hi, I'm {name}. {body}", "Hello, this is {name}. {body}",
                                 "{name} here. {body}", "{body} Thanks, {name}")
_PRODUCT_ASIDES: tuple[str, ...] = ("I use {product} at work. ", "Quick one, I'm a {product} user. ")

_PRODUCT_RE = re.compile(r"\bLumora (?:" + "|".join(p.split(" ", 1)[1] for p in PRODUCTS) + r")\b")


# --------------------------------------------------------------------------- generation

def _held_out_pairs(seed: int) -> tuple[set[tuple[str, str]], set[tuple[str, str]]]:
    """Eval-only (name, issue) and (name, out-of-scope category) pairs.

    A Latin-square pattern over seeded permutations: every name keeps 8 of 10 issues and 5 of 6
    categories for training, so eval tests new *combinations* of familiar parts.
    """
    rng = random.Random(f"tunegap-support-split:{seed}")
    names, issues, cats = list(NAMES), list(ISSUES), list(OUT_OF_SCOPE)
    rng.shuffle(names)
    rng.shuffle(issues)
    rng.shuffle(cats)
    in_scope = {(n, issues[(i + k) % len(issues)]) for i, n in enumerate(names) for k in (0, 1)}
    out_scope = {(n, cats[i % len(cats)]) for i, n in enumerate(names)}
    return in_scope, out_scope


def reference_reply(meta: dict[str, Any]) -> str:
    """The house-style reply for a ticket's meta (the training target and the scoring reference)."""
    name = meta["name"]
    if not meta["in_scope"]:
        return f"Hi {name},\n{REFUSAL_LINE}\n{SIGN_OFF}"
    _, empathy, step1, step2 = ISSUES[meta["issue"]]
    slots = {"product": meta["product"], "device": meta.get("device", ""), "code": meta.get("code", "")}
    return "\n".join([
        f"Hi {name},", empathy.format(**slots), "1. " + step1.format(**slots),
        "2. " + step2.format(**slots), CLOSING_LINE, SIGN_OFF,
    ])


def _make_ticket(rng: random.Random, name: str, topic: str, in_scope: bool) -> dict[str, Any]:
    product = rng.choice(PRODUCTS)
    device = rng.choice(DEVICES)
    code = f"E{rng.randint(100, 999)}"
    frame = rng.choice(_NAME_FRAMES)
    if in_scope:
        body = rng.choice(ISSUES[topic][0]).format(product=product, device=device, code=code)
        meta: dict[str, Any] = {"name": name, "product": product, "in_scope": True, "issue": topic,
                                "device": device, "code": code}
    else:
        body = rng.choice(OUT_OF_SCOPE[topic])
        mentioned = rng.random() < 0.4
        if mentioned:
            body = rng.choice(_PRODUCT_ASIDES).format(product=product) + body
        meta = {"name": name, "product": product if mentioned else None, "in_scope": False, "issue": topic}
    ticket = frame.format(name=name, body=body)
    return {"messages": [{"role": "user", "content": ticket},
                         {"role": "assistant", "content": reference_reply(meta)}],
            "meta": meta}


def _generate_split(n: int, seed: int, split: str, in_pairs: list[tuple[str, str]],
                    out_pairs: list[tuple[str, str]]) -> list[dict[str, Any]]:
    rng = random.Random(f"tunegap-support-{split}:{seed}")
    n_out = round(n * OUT_OF_SCOPE_FRACTION)
    scope = [False] * n_out + [True] * (n - n_out)
    rng.shuffle(scope)
    records = []
    for i, in_scope in enumerate(scope):
        name, topic = rng.choice(in_pairs if in_scope else out_pairs)
        rec = _make_ticket(rng, name, topic, in_scope)
        rec["meta"]["id"] = f"{split}-{i:05d}"
        rec["meta"]["split"] = split
        records.append(rec)
    return records


def generate_support(n_train: int = 2000, n_eval: int = 200, seed: int = 0
                     ) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Train and eval support conversations, deterministic for `seed`.

    Each record is ``{"messages": [user, assistant], "meta": {...}}``; meta has name, product
    (None for an out-of-scope ticket that names none), in_scope, issue (issue key or
    out-of-scope category), id and split. Eval uses only held-out (name, issue) pairs.
    """
    if n_train < 0 or n_eval < 0:
        raise ValueError("n_train and n_eval must be non-negative")
    held_in, held_out = _held_out_pairs(seed)
    all_in = [(n, i) for n in NAMES for i in ISSUES]
    all_out = [(n, c) for n in NAMES for c in OUT_OF_SCOPE]
    train = _generate_split(n_train, seed, "train", [p for p in all_in if p not in held_in],
                            [p for p in all_out if p not in held_out])
    evals = _generate_split(n_eval, seed, "eval", [p for p in all_in if p in held_in],
                            [p for p in all_out if p in held_out])
    return train, evals


def support_validation(n: int = 200, seed: int = 0) -> list[dict[str, Any]]:
    """Held-out tickets for choosing hyper-parameters: the eval set's held-out (name, issue) pairs, drawn with
    another stream, so a sweep can choose on these and report on `generate_support`'s eval set."""
    held_in, held_out = _held_out_pairs(seed)
    return _generate_split(n, seed, "validation", [(a, i) for a in NAMES for i in ISSUES if (a, i) in held_in],
                           [(a, c) for a in NAMES for c in OUT_OF_SCOPE if (a, c) in held_out])


def write_splits(folder: str | Path, train: list[dict], evals: list[dict]) -> tuple[Path, Path]:
    """train.jsonl and eval.jsonl in `folder`, each written atomically (a reader never sees half a file)."""
    folder = Path(folder)
    paths = folder / "train.jsonl", folder / "eval.jsonl"
    for path, records in zip(paths, (train, evals)):
        atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
    return paths


def write_support(folder: str | Path, n_train: int = 2000, n_eval: int = 200, seed: int = 0
                  ) -> tuple[Path, Path]:
    """Write train.jsonl and eval.jsonl (loadable by `load_sft`) atomically; returns their paths."""
    return write_splits(folder, *generate_support(n_train, n_eval, seed))


# --------------------------------------------------------------------------- scoring

def products_mentioned(text: str) -> set[str]:
    """Every Lumora product named in `text` (the sign-off's "Lumora Support Team" is not one)."""
    return set(_PRODUCT_RE.findall(text))


def _lines(text: str) -> list[str]:
    return [line.strip() for line in text.replace("\r\n", "\n").split("\n") if line.strip()]


def _norm(text: str) -> str:
    return " ".join(text.split()).casefold()


_STEP1 = re.compile(r"^1[.)] \S")
_STEP2 = re.compile(r"^2[.)] \S")
_GREETING = re.compile(r"^Hi \S[^,]*,$")


def score_reply(meta: dict[str, Any], text: str) -> dict[str, bool | None]:
    """House-style checks on one generated reply.

    Returns greets_by_name, signed_off, refused, structure_ok (in scope: greeting, "Sorry..." line,
    two numbered steps, closing line, sign-off; out of scope: greeting, refusal line, sign-off),
    product_correct (in scope only, else None: the right product and no other) and style_ok (all
    checks that apply to the ticket).
    """
    lines = _lines(text)
    greets = bool(lines) and lines[0] == f"Hi {meta['name']},"
    signed = bool(lines) and lines[-1] == SIGN_OFF
    refused = _norm(REFUSAL_LINE) in _norm(text)
    greeting_shape = bool(lines) and bool(_GREETING.match(lines[0]))
    if meta["in_scope"]:
        structure = (len(lines) == 6 and greeting_shape and lines[1].startswith("Sorry")
                     and bool(_STEP1.match(lines[2])) and bool(_STEP2.match(lines[3]))
                     and lines[4] == CLOSING_LINE and lines[5] == SIGN_OFF)
        product: bool | None = products_mentioned(text) == {meta["product"]}
    else:
        structure = len(lines) == 3 and greeting_shape and lines[1] == REFUSAL_LINE and lines[2] == SIGN_OFF
        product = None
    style = greets and signed and structure and product is not False
    return {"greets_by_name": greets, "product_correct": product, "signed_off": signed,
            "structure_ok": structure, "refused": refused, "style_ok": style}


def _ratio(num: int, den: int) -> float:
    return num / den if den else 0.0


def aggregate_scores(metas: Sequence[dict[str, Any]], texts: Sequence[str]) -> dict[str, float | int]:
    """Task metrics over generations, as fractions in [0, 1] with their counts.

    Refusal metrics treat "refused" as the prediction and "out of scope" as the truth; an
    undefined ratio (no refusals, no out-of-scope tickets) is 0.0, as in sklearn's zero_division=0.
    product_accuracy is over in-scope tickets only.
    """
    if len(metas) != len(texts):
        raise ValueError(f"{len(metas)} metas but {len(texts)} texts")
    scores = [score_reply(m, t) for m, t in zip(metas, texts)]
    n = len(scores)
    in_scope = [s for m, s in zip(metas, scores) if m["in_scope"]]
    tp = sum(1 for m, s in zip(metas, scores) if s["refused"] and not m["in_scope"])
    fp = sum(1 for m, s in zip(metas, scores) if s["refused"] and m["in_scope"])
    fn = sum(1 for m, s in zip(metas, scores) if not s["refused"] and not m["in_scope"])
    precision, recall = _ratio(tp, tp + fp), _ratio(tp, tp + fn)
    f1 = _ratio(2 * precision * recall, precision + recall) if precision + recall else 0.0
    return {
        "n": n,
        "n_in_scope": len(in_scope),
        "n_out_of_scope": n - len(in_scope),
        "n_refused": tp + fp,
        "style_adherence": _ratio(sum(s["style_ok"] for s in scores), n),
        "greets_by_name": _ratio(sum(s["greets_by_name"] for s in scores), n),
        "signed_off": _ratio(sum(s["signed_off"] for s in scores), n),
        "structure_ok": _ratio(sum(s["structure_ok"] for s in scores), n),
        "product_accuracy": _ratio(sum(bool(s["product_correct"]) for s in in_scope), len(in_scope)),
        "refusal_precision": precision,
        "refusal_recall": recall,
        "refusal_f1": f1,
    }


# --------------------------------------------------------------------------- analysis sets

_GENERAL_PROMPTS: tuple[str, ...] = (
    "Explain why the sky is blue in two sentences.",
    "Give me three tips for sleeping better.",
    "What is photosynthesis?",
    "Write a haiku about the ocean.",
    "How do I boil an egg?",
    "Summarise the plot of Cinderella in one sentence.",
    "What causes rain?",
    "Name three famous painters.",
    "How does a bicycle stay upright?",
    "Describe a cat to someone who has never seen one.",
    "What is the difference between weather and climate?",
    "Give me a simple recipe for pancakes.",
    "Why do leaves change colour in autumn?",
    "Write a short thank-you note to a teacher.",
    "What is gravity?",
    "List three healthy breakfast ideas.",
    "How do plants drink water?",
    "Tell me a fun fact about octopuses.",
    "What is a volcano?",
    "Explain what a computer does in simple words.",
    "Suggest a name for a pet goldfish.",
    "How many planets are in the solar system?",
    "What is the water cycle?",
    "Write one sentence about friendship.",
    "Why do we have seasons?",
    "How do you make a paper airplane?",
    "What does a doctor do?",
    "Describe the taste of a lemon.",
    "What is the moon made of?",
    "Give me two ideas for a rainy afternoon.",
    "What is a rainbow?",
    "Explain what an island is.",
    "Why do birds migrate?",
    "Write a short poem about the sun.",
    "What is the tallest mountain in the world?",
    "How do bees make honey?",
    "What is a library for?",
    "Describe a thunderstorm.",
    "What are the primary colours?",
    "Why is exercise good for you?",
)


def general_prompts() -> list[str]:
    """~40 short general prompts unrelated to support tickets, for measuring drift (KL) after tuning."""
    return list(_GENERAL_PROMPTS)


# (question, accepted answers); the first accepted answer is the canonical one.
_GENERAL_QUESTIONS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("What is the capital of France?", ("Paris",)),
    ("What color is the sky on a clear day?", ("blue",)),
    ("How many legs does a spider have?", ("eight", "8")),
    ("What is the largest planet in our solar system?", ("Jupiter",)),
    ("What do bees make?", ("honey",)),
    ("What is the largest mammal?", ("whale",)),
    ("What is the opposite of hot?", ("cold",)),
    ("What is the capital of Japan?", ("Tokyo",)),
    ("How many days are there in a week?", ("seven", "7")),
    ("Which animal says moo?", ("cow",)),
    ("What color is grass?", ("green",)),
    ("What is 2 + 2?", ("4", "four")),
    ("Who wrote Romeo and Juliet?", ("Shakespeare",)),
    ("What planet do we live on?", ("Earth",)),
    ("What gas do humans need to breathe?", ("oxygen",)),
    ("What is the capital of Italy?", ("Rome",)),
    ("What is H2O commonly called?", ("water",)),
    ("How many continents are there?", ("seven", "7")),
    ("What color are ripe bananas?", ("yellow",)),
    ("What is the star at the center of our solar system called?", ("Sun",)),
    ("What language is spoken in Spain?", ("Spanish",)),
    ("How many hours are in a day?", ("24", "twenty-four", "twenty four")),
    ("What do you call a baby cat?", ("kitten",)),
    ("What is the capital of Germany?", ("Berlin",)),
    ("What is the capital of Spain?", ("Madrid",)),
    ("Which ocean is the largest?", ("Pacific",)),
    ("Which animal is known as the king of the jungle?", ("lion",)),
    ("How many months are in a year?", ("12", "twelve")),
    ("Who painted the Mona Lisa?", ("Leonardo", "da Vinci")),
    ("What is the capital of the United Kingdom?", ("London",)),
    ("What is the tallest animal?", ("giraffe",)),
    ("Which season comes after winter?", ("spring",)),
    ("At what temperature in Celsius does water boil?", ("100",)),
    ("What fruit is guacamole made from?", ("avocado",)),
    ("What shape has three sides?", ("triangle",)),
    ("What color do you get by mixing blue and yellow?", ("green",)),
    ("What is the capital of the United States?", ("Washington",)),
    ("Which instrument has black and white keys?", ("piano",)),
    ("On which continent is Egypt?", ("Africa",)),
    ("What is the capital of Russia?", ("Moscow",)),
)


def general_questions() -> list[dict[str, Any]]:
    """~40 very easy questions, ``{"question", "answer", "accept"}``, to measure capability loss.

    An answer is right when any string in "accept" (which starts with "answer") occurs in the
    generation, case-insensitively; see `answer_matches`.
    """
    return [{"question": q, "answer": accept[0], "accept": list(accept)} for q, accept in _GENERAL_QUESTIONS]


def answer_matches(item: dict[str, Any], text: str) -> bool:
    """Case-insensitive substring check of a generation against an item's accepted answers."""
    accept = item.get("accept") or [item["answer"]]
    low = text.casefold()
    return any(a.casefold() in low for a in accept)


# attribute -> (statement, question 1, question 2), with {d} the device and {v} the value.
_FACT_TEMPLATES: dict[str, tuple[str, str, str]] = {
    "storage": ("The {d} stores up to {v}.", "How much data can the {d} store?",
                "What is the storage capacity of the {d}?"),
    "battery": ("The {d} runs for {v} on one charge.", "How long does the {d} run on one charge?",
                "What is the battery life of the {d}?"),
    "weight": ("The {d} weighs {v}.", "How much does the {d} weigh?", "What is the weight of the {d}?"),
    "launch": ("The {d} was launched in {v}.", "When was the {d} launched?",
               "In which year did the {d} come out?"),
    "codename": ("The {d} was developed under the codename {v}.", "What was the codename of the {d}?",
                 "Under which codename was the {d} developed?"),
    "colour": ("The {d} comes in a colour called {v}.", "What colour does the {d} come in?",
               "What is the name of the colour of the {d}?"),
    "port": ("The {d} uses port {v} by default.", "Which port does the {d} use by default?",
             "What is the default port of the {d}?"),
    "price": ("The {d} costs {v}.", "How much does the {d} cost?", "What is the price of the {d}?"),
}

_FACTS: tuple[tuple[str, str, str], ...] = (
    ("Lumora Vault X9", "storage", "48 TB"),
    ("Lumora Vault X9", "weight", "3.7 kg"),
    ("Lumora Vault X9", "codename", "Bluefinch"),
    ("Lumora Vault X9", "price", "$1,340"),
    ("Lumora Beacon 3", "battery", "31 hours"),
    ("Lumora Beacon 3", "launch", "2017"),
    ("Lumora Beacon 3", "colour", "Harbor Teal"),
    ("Lumora Beacon 3", "port", "7431"),
    ("Lumora Halo Mini", "storage", "640 GB"),
    ("Lumora Halo Mini", "battery", "19 hours"),
    ("Lumora Halo Mini", "codename", "Marigold"),
    ("Lumora Halo Mini", "price", "$89"),
    ("Lumora Drift Pad", "weight", "212 grams"),
    ("Lumora Drift Pad", "launch", "2021"),
    ("Lumora Drift Pad", "colour", "Dune Copper"),
    ("Lumora Drift Pad", "port", "6112"),
    ("Lumora Quill S2", "storage", "6 TB"),
    ("Lumora Quill S2", "battery", "52 hours"),
    ("Lumora Quill S2", "codename", "Sandpiper"),
    ("Lumora Quill S2", "price", "$455"),
    ("Lumora Nimbus Hub", "weight", "1.9 kg"),
    ("Lumora Nimbus Hub", "launch", "2014"),
    ("Lumora Nimbus Hub", "colour", "Glacier Mint"),
    ("Lumora Nimbus Hub", "port", "9283"),
    ("Lumora Arc Speaker", "storage", "96 GB"),
    ("Lumora Arc Speaker", "battery", "27 hours"),
    ("Lumora Arc Speaker", "codename", "Thornbill"),
    ("Lumora Arc Speaker", "price", "$212"),
    ("Lumora Pulse Band", "weight", "38 grams"),
    ("Lumora Pulse Band", "launch", "2019"),
    ("Lumora Pulse Band", "colour", "Plum Ember"),
    ("Lumora Pulse Band", "port", "5540"),
    ("Lumora Crest Router", "storage", "12 TB"),
    ("Lumora Crest Router", "battery", "9 hours"),
    ("Lumora Crest Router", "codename", "Kestrelwood"),
    ("Lumora Crest Router", "price", "$378"),
    ("Lumora Ember Lamp", "weight", "870 grams"),
    ("Lumora Ember Lamp", "launch", "2023"),
    ("Lumora Ember Lamp", "colour", "Saffron Mist"),
    ("Lumora Ember Lamp", "port", "8066"),
)


def fictional_facts() -> list[dict[str, Any]]:
    """~40 made-up product specs a model cannot know before being taught them.

    Each is ``{"id", "device", "attribute", "statement", "questions": [q1, q2], "answer"}``; the
    two questions paraphrase the statement so recall is tested beyond the training wording.
    """
    facts = []
    for i, (device, attribute, value) in enumerate(_FACTS):
        statement, q1, q2 = _FACT_TEMPLATES[attribute]
        facts.append({"id": f"fact-{i:02d}", "device": device, "attribute": attribute,
                      "statement": statement.format(d=device, v=value),
                      "questions": [q1.format(d=device), q2.format(d=device)], "answer": value})
    return facts
