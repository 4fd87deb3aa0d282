"""`tunegap analyze probe`: what each layer of the frozen base model already encodes, by linear probes.

Tenney et al. (2019) fit a small classifier on each layer's frozen representations and read off where a
property becomes linearly decodable. At our scale: a multinomial logistic regression (L2, fitted by L-BFGS)
per layer and property, trained on one split and scored on a disjoint one, for
  * refusal: is the support ticket out of scope? (balanced classes; tickets from the held-out split for test)
  * product: which of the 8 products an in-scope ticket names;
  * agreement: is the head noun of "The key(s) near the cabinet(s)" plural, read at the *last* token, which is
    the distractor noun: its own embedding says nothing about the head, so only context can (Linzen et al. 2016's
    agreement set-up); head nouns in the test split never appear in training.
Ticket properties use the mean over the ticket's tokens (Tenney's span pooling, simplified); agreement uses the
last position. Layer 0 is the embedding output. Controls: the majority-class rate, and the same probes on the
same architecture with random weights, which separates what pretraining built from what the tokens give away.
"""

from __future__ import annotations

import contextlib
import random
import time
from pathlib import Path

from ..data.support import PRODUCTS, generate_support
from ..literature import anchor
from ..models import load_model
from ..precision import autocast_factory
from ..report import Section, Verdict
from ..stats import Interval, Judgement, judge, mean_interval
from .common import (ORDER, QUICK_MODEL, check_seeds, figure, fmt, md_table, q, quick_aware, save_figure,
                     write_outputs)

HEADS = (("key", "keys"), ("author", "authors"), ("picture", "pictures"), ("road", "roads"),
         ("teacher", "teachers"), ("box", "boxes"), ("letter", "letters"), ("dog", "dogs"), ("bottle", "bottles"),
         ("house", "houses"), ("friend", "friends"), ("car", "cars"), ("painting", "paintings"),
         ("student", "students"), ("door", "doors"), ("bridge", "bridges"))
PREPOSITIONS = ("near the", "next to the", "behind the", "of the", "beside the", "for the")
ATTRACTORS = (("cabinet", "cabinets"), ("tree", "trees"), ("window", "windows"), ("table", "tables"),
              ("garden", "gardens"), ("wall", "walls"), ("city", "cities"), ("hill", "hills"))
TEST_HEADS = 5  # the last five head nouns are test-only


# --------------------------------------------------------------------------- the probe

def fit_probe(x_train, y_train, x_test, y_test, *, l2: float = 1e-2, max_iter: int = 200) -> dict:
    """Multinomial logistic regression on standardised features; returns train and test accuracy.

    Standardisation uses the training split's statistics only; L-BFGS (strong Wolfe line search) on the
    mean cross-entropy + l2 * ||W||^2, full batch, deterministic. One thread: these are tiny matrices, where
    thread synchronisation costs more than it saves (40x slower on a busy 2-core machine, measured).
    """
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _fit(x_train, y_train, x_test, y_test, l2, max_iter)
    finally:
        torch.set_num_threads(threads)


def _fit(x_train, y_train, x_test, y_test, l2: float, max_iter: int) -> dict:
    import torch

    x_train, x_test = x_train.double(), x_test.double()
    mean, std = x_train.mean(0), x_train.std(0).clamp_min(1e-6)
    a, b = (x_train - mean) / std, (x_test - mean) / std
    classes = int(max(int(y_train.max()), int(y_test.max()))) + 1
    w = torch.zeros(a.shape[1], classes, dtype=torch.float64, requires_grad=True)
    bias = torch.zeros(classes, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([w, bias], lr=1.0, max_iter=max_iter, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(a @ w + bias, y_train) + l2 * (w ** 2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    with torch.no_grad():
        train_acc = float(((a @ w + bias).argmax(1) == y_train).double().mean())
        test_acc = float(((b @ w + bias).argmax(1) == y_test).double().mean())
    return {"train_accuracy": train_acc, "test_accuracy": test_acc}


def majority_rate(y_train, y_test) -> float:
    """Accuracy of always predicting the training split's most common class."""
    import torch

    top = int(torch.bincount(y_train).argmax())
    return float((y_test == top).double().mean())


# --------------------------------------------------------------------------- datasets

def agreement_items(seed: int = 0) -> tuple[list[tuple[str, int]], list[tuple[str, int]]]:
    """(text, 1 if the head noun is plural) for train and test; test heads never occur in training."""
    items = {"train": [], "test": []}
    for h, (sg, pl) in enumerate(HEADS):
        split = "test" if h >= len(HEADS) - TEST_HEADS else "train"
        for plural, head in ((0, sg), (1, pl)):
            for prep in PREPOSITIONS:
                for asg, apl in ATTRACTORS:
                    for attractor in (asg, apl):
                        items[split].append((f"The {head} {prep} {attractor}", plural))
    rng = random.Random(f"tunegap-probe-agreement:{seed}")
    for split in items:
        rng.shuffle(items[split])
    return items["train"], items["test"]


def ticket_items(n_per_class: int, seed: int = 0) -> dict:
    """Refusal (balanced) and product datasets from the support task: train split to fit, eval split to test."""
    train, evals = generate_support()
    rng = random.Random(f"tunegap-probe-tickets:{seed}")

    def refusal(records, n):
        out_ = [r for r in records if not r["meta"]["in_scope"]]
        in_ = [r for r in records if r["meta"]["in_scope"]]
        n = min(n, len(out_), len(in_))
        chosen = rng.sample(out_, n) + rng.sample(in_, n)
        return [(r["messages"][0]["content"], 0 if r["meta"]["in_scope"] else 1) for r in chosen]

    def product(records, n):
        in_ = [r for r in records if r["meta"]["in_scope"]]
        chosen = rng.sample(in_, min(n, len(in_)))
        return [(r["messages"][0]["content"], PRODUCTS.index(r["meta"]["product"])) for r in chosen]

    return {"refusal": (refusal(train, n_per_class), refusal(evals, n_per_class)),
            "product": (product(train, 3 * n_per_class), product(evals, n_per_class))}


def layer_features(model, tokenizer, texts: list[str], pool: str, batch_size: int = 32,
                   autocast=contextlib.nullcontext):
    """[layers + 1, n, hidden]: each layer's hidden state, mean-pooled over the text's tokens or at its last token.

    `autocast` (bf16 where this CPU's measured bf16 matmul is faster, as the training loop chooses) halves the
    forward time; the probe itself is fitted in float64.
    """
    import torch

    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    encoded = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
    chunks = []
    model.eval()
    with torch.no_grad(), autocast():
        for i in range(0, len(encoded), batch_size):
            batch = encoded[i:i + batch_size]
            width = max(len(e) for e in batch)
            ids = torch.tensor([e + [pad] * (width - len(e)) for e in batch])
            mask = torch.tensor([[1] * len(e) + [0] * (width - len(e)) for e in batch])
            hidden = torch.stack(model(input_ids=ids, attention_mask=mask, output_hidden_states=True,
                                       use_cache=False).hidden_states).float()  # [L+1, B, T, H]
            if pool == "mean":
                m = mask[None, :, :, None].float()
                chunks.append((hidden * m).sum(2) / m.sum(2))
            else:
                last = torch.tensor([len(e) - 1 for e in batch])
                chunks.append(hidden[:, torch.arange(len(batch)), last])
    return torch.cat(chunks, dim=1)


PROPERTIES = {"refusal": "mean", "product": "mean", "agreement": "last"}


def probe_model(model, tokenizer, data: dict, autocast=contextlib.nullcontext) -> dict:
    """Per property: test accuracy of a probe on every layer, plus the majority-class rate."""
    import torch

    out = {}
    for name, (train, test) in data.items():
        started = time.perf_counter()
        pool = PROPERTIES[name]
        xs_train = layer_features(model, tokenizer, [t for t, _ in train], pool, autocast=autocast)
        xs_test = layer_features(model, tokenizer, [t for t, _ in test], pool, autocast=autocast)
        y_train = torch.tensor([y for _, y in train])
        y_test = torch.tensor([y for _, y in test])
        layers = [fit_probe(xs_train[i], y_train, xs_test[i], y_test) for i in range(xs_train.shape[0])]
        out[name] = {"pool": pool, "n_train": len(train), "n_test": len(test),
                     "classes": int(max(int(y_train.max()), int(y_test.max()))) + 1,
                     "majority": majority_rate(y_train, y_test),
                     "test_accuracy": [r["test_accuracy"] for r in layers],
                     "train_accuracy": [r["train_accuracy"] for r in layers]}
        print(f"tunegap: probe {name}: best held-out accuracy {max(out[name]['test_accuracy']):.3f} over "
              f"{len(layers)} layers ({time.perf_counter() - started:.0f} s, measured)", flush=True)
    return out


@quick_aware
def analyze_probe(*, out: str | Path, model: str = "smollm2-135m", n: int = 100, control: bool = True,
                  quick: bool = False, seed: int = 0, seeds: int = 3) -> dict:
    """Probes per layer, repeated over `seeds` draws of the probe data (and of the random-weight control): the
    pretrained weights are fixed, so the seeds measure how much the verdicts depend on which items were drawn."""
    started = time.perf_counter()
    out, seeds = Path(out), check_seeds(seeds)
    if quick:
        model, n = QUICK_MODEL, 12
    precision = "fp32"
    if not quick:
        from ..costs.hardware import measure_peaks

        precision = measure_peaks().best_precision
    autocast = autocast_factory(precision)
    pretrained, tokenizer = load_model(model)
    per_seed = []
    for s in range(seed, seed + seeds):
        train_agree, test_agree = agreement_items(s)
        data = {**ticket_items(n, s), "agreement": (train_agree[:4 * n], test_agree[:2 * n])}
        models = {"pretrained": probe_model(pretrained, tokenizer, data, autocast)}
        if control:
            scratch, _ = load_model(model, init="scratch", seed=s + 1)
            models["random_init"] = probe_model(scratch, tokenizer, data, autocast)
            del scratch
        per_seed.append(models)
    del pretrained
    summaries = [_summary(models, control) for models in per_seed]
    results = {"analysis": "probe", "model": model, "quick": quick, "how": "measured (held-out probe accuracy)",
               "precision": precision, "seeds": seeds,
               "models": per_seed[0], "summary": summaries[0], "intervals": _intervals(summaries),
               "per_seed_summary": summaries,
               "wall_seconds": q(time.perf_counter() - started, "s", "measured")}
    out.mkdir(parents=True, exist_ok=True)
    images = [_plot(per_seed[0], out / "probe_layers.png")]
    section = probe_section(results, images)
    write_outputs(out, results, section)
    return results


def _summary(models: dict, control: bool) -> dict:
    summary = {}
    for prop, r in models["pretrained"].items():
        acc = r["test_accuracy"]
        best = max(range(len(acc)), key=lambda i: (acc[i], -i))
        first = next(i for i, a in enumerate(acc) if a >= acc[best] - 0.02)
        summary[prop] = {"best_layer": best, "best_accuracy": acc[best], "layer0_accuracy": acc[0],
                         "first_layer_within_2pt": first, "depth_fraction": first / (len(acc) - 1),
                         "majority": r["majority"], "layers": len(acc) - 1,
                         "random_init_best": (max(models["random_init"][prop]["test_accuracy"])
                                              if control else None)}
    return summary


def _intervals(summaries: list[dict]) -> dict:
    """Per property, 95% intervals over seeds of what the verdicts read (accuracy fractions, measured)."""
    def interval(prop, fn):
        return mean_interval([fn(s[prop]) for s in summaries if s[prop] is not None]).as_dict("fraction")

    out = {}
    for prop, first in summaries[0].items():
        out[prop] = {"best_accuracy": interval(prop, lambda v: v["best_accuracy"]),
                     "over_majority": interval(prop, lambda v: v["best_accuracy"] - v["majority"]),
                     "gain_over_layer0": interval(prop, lambda v: v["best_accuracy"] - v["layer0_accuracy"])}
        if first["random_init_best"] is not None:
            out[prop]["over_random_init"] = interval(prop, lambda v: v["best_accuracy"] - v["random_init_best"])
    return out


def features_verdict(intervals: dict, props: list[str]) -> Judgement:
    """Present when every property's best accuracy is resolved >= 0.9 and >= 20 points over the majority
    class; absent when one is resolved below either bar; otherwise not resolved."""
    judged = [judge(Interval.from_dict(intervals[p]["best_accuracy"]), 0.9, claim_below=False) for p in props]
    judged += [judge(Interval.from_dict(intervals[p]["over_majority"]), 0.2, claim_below=False) for p in props]
    if all(j.supported for j in judged):
        return Judgement(True, "")
    if any(j.supported is False for j in judged):
        return Judgement(False, "")
    return next(j for j in judged if j.supported is None)


def depth_verdict(interval: dict) -> Judgement:
    """Context built with depth: the best layer beats layer 0 by >= 20 points (and the random-weight control by
    >= 10); not supported when the gain is resolved below 5 points; otherwise not resolved."""
    gain = Interval.from_dict(interval["gain_over_layer0"])
    control = Interval.from_dict(interval["over_random_init"]) if "over_random_init" in interval else None
    high = judge(gain, 0.2, claim_below=False)
    beats = judge(control, 0.1, claim_below=False) if control else Judgement(True, "")
    if high.supported and beats.supported:
        return Judgement(True, "")
    if judge(gain, 0.05, claim_below=True).supported or beats.supported is False:
        return Judgement(False, "")
    return high if high.supported is None else beats


def _plot(models: dict, path: Path) -> Path:
    props = list(models["pretrained"])
    fig = figure(4 * len(props), 3.8)
    for j, prop in enumerate(props):
        ax = fig.add_subplot(1, len(props), j + 1)
        for label, style in (("pretrained", "-"), ("random_init", ":")):
            if label in models:
                acc = models[label][prop]["test_accuracy"]
                ax.plot(range(len(acc)), acc, linestyle=style, marker=".", label=f"{label.replace('_', ' ')} weights")
        ax.axhline(models["pretrained"][prop]["majority"], color="grey", linestyle="--", linewidth=0.8,
                   label="majority class")
        ax.set_ylim(0, 1.02)
        ax.set_xlabel("layer (0 = embeddings)")
        ax.set_ylabel("held-out probe accuracy (measured)")
        ax.set_title(f"{prop} ({models['pretrained'][prop]['pool']} pooling)", fontsize=9)
        ax.legend(fontsize=7)
    fig.suptitle("Linear probes on each layer of the frozen model (Tenney et al. 2019, small scale)", fontsize=10)
    return save_figure(fig, path)


def probe_section(results: dict, images: list[Path]):
    s, iv = results["summary"], results["intervals"]
    task = [p for p in ("refusal", "product") if p in s]
    judged = features_verdict(iv, task)
    exists = judged.supported
    note = (f"held-out tickets, {results['seeds']} seed(s) of probe data; 0.9 accuracy and 20 points over the "
            "majority class, over the whole 95% interval, count as present" + (f"; {judged.note}" if judged.note else ""))
    if "random_init" in results["models"]:
        top = {p: (results["models"]["pretrained"][p]["test_accuracy"][-1],
                   results["models"]["random_init"][p]["test_accuracy"][-1]) for p in task}
        note += ("; top layer, pretrained vs random weights: "
                 + ", ".join(f"{p} {a:.2f} vs {b:.2f}" for p, (a, b) in top.items()))
        if all(s[p]["random_init_best"] is not None and s[p]["random_init_best"] >= s[p]["best_accuracy"] - 0.05
               for p in task):
            note += ("; random weights decode them too (at the embeddings): these task features are lexical, "
                     "so this probe cannot credit pretraining with creating them, only with keeping them through depth")
    verdicts = [Verdict(
        "The features the task needs already exist in the frozen model (linearly decodable).",
        "; ".join(f"{p}: best {Interval.from_dict(iv[p]['best_accuracy']).text(2)} (seed 0: layer {s[p]['best_layer']}/"
                  f"{s[p]['layers']}, majority {s[p]['majority']:.2f})" for p in task), exists, note,
        anchor("probe_features", exists), unresolved=exists is None)]
    if "agreement" in s:
        a = s["agreement"]
        depth = depth_verdict(iv["agreement"])
        supported = depth.supported
        curve = results["models"]["pretrained"]["agreement"]["test_accuracy"]
        first90 = next((i for i, x in enumerate(curve) if x >= 0.9), None)
        verdicts.append(Verdict(
            "Pretraining builds contextual structure with depth (Tenney et al.'s picture).",
            f"head-noun number at the distractor token: layer 0 {a['layer0_accuracy']:.2f}, "
            f"best {a['best_accuracy']:.2f} at layer {a['best_layer']}/{a['layers']}, first >= 0.9 at layer "
            f"{first90 if first90 is not None else 'none'}; random-weight control best {fmt(a['random_init_best'])} "
            f"(seed 0); gain of the best layer over layer 0: {Interval.from_dict(iv['agreement']['gain_over_layer0']).text(2)}",
            supported,
            "the embedding of the last token cannot know the head noun; only context can"
            + (f"; {depth.note}" if depth.note else ""),
            anchor("probe_depth", supported), unresolved=supported is None))
    rows = []
    for p, v in s.items():
        r = results["models"]["pretrained"][p]
        rows.append([p, r["pool"], f"{r['n_train']}/{r['n_test']}", fmt(v["majority"]), fmt(v["layer0_accuracy"]),
                     f"{v['best_accuracy']:.3f} (layer {v['best_layer']})",
                     f"{v['first_layer_within_2pt']} ({100 * v['depth_fraction']:.0f}% of depth)",
                     fmt(v["random_init_best"])])
    quick = " (quick: random tiny model; code path only)" if results["quick"] else ""
    body = "\n".join([
        f"Model `{results['model']}`{quick}, frozen. One logistic-regression probe per layer and property, "
        "fitted on one split, scored (measured) on a disjoint one.",
        "",
        md_table(["property", "pooling", "train/test", "majority", "layer 0", "best", "first layer within 2 points",
                  "random-weights best"], rows),
        "",
        "Ticket properties are largely lexical (product names and topic words are in the text), so even embeddings "
        "or random weights can decode some of them; the agreement probe at a distractor token is the one that "
        "needs context, and the random-weight control shows what pretraining added.",
    ])
    return Section(title="What the layers hold: linear probes", verdicts=verdicts, body_markdown=body, images=images,
                   order=ORDER["probe"])


__all__ = ["analyze_probe", "features_verdict", "depth_verdict", "fit_probe", "majority_rate", "agreement_items", "ticket_items", "layer_features",
           "probe_model"]
