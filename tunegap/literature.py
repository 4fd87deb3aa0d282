"""The published results each verdict is read beside: paper, where in it, their finding, and why ours may differ.

A verdict measured on a 135M-parameter model and a few thousand tokens means little alone; a reviewer asks what
the papers that measured the same claim at scale found. Each `Anchor` states that finding, with a number only
where the paper states it plainly (the abstract or a headline result), and two prepared sentences: one for when
tunegap's small-scale result agrees with it, one for when it does not, each saying why that may be. Which one
is shown follows from the verdict and the paper's own answer (`finding_supports`), never from a free choice.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Anchor:
    paper: str
    where: str  # the part of the paper that states the finding
    finding: str  # their result, in their units
    finding_supports: bool  # does the paper's finding support the essay's claim, as the verdict phrases it?
    agrees: str  # one sentence: where tunegap's result agrees, and why that may be
    differs: str  # one sentence: where it differs, and why that may be
    neutral: str = ""  # for a verdict that is a trade-off by design (supported None), the sentence shown instead

    def beside(self, supported: bool | None) -> dict:
        """The anchor as a report shows it beside a verdict (`supported` None: not resolved, so no comparison)."""
        if supported is None and self.neutral:
            comparison, relation = self.neutral, "agrees"
        elif supported is None:
            comparison = ("tunegap's measurement does not resolve the claim at this budget, so it neither agrees "
                          "nor disagrees with this finding.")
            relation = "unresolved"
        elif supported == self.finding_supports:
            comparison, relation = self.agrees, "agrees"
        else:
            comparison, relation = self.differs, "differs"
        return {"paper": self.paper, "where": self.where, "finding": self.finding, "relation": relation,
                "comparison": comparison}


BIDERMAN = "Biderman et al. 2024, LoRA Learns Less and Forgets Less (TMLR)"
SCHULMAN = "Schulman et al. 2025, LoRA Without Regret (Thinking Machines blog)"
OVADIA = "Ovadia et al. 2023, Fine-Tuning or Retrieval? Comparing Knowledge Injection in LLMs (arXiv 2312.05934)"
HU = "Hu et al. 2021, LoRA: Low-Rank Adaptation of Large Language Models (arXiv 2106.09685)"
AGHAJANYAN = "Aghajanyan et al. 2020, Intrinsic Dimensionality Explains the Effectiveness of LM Fine-Tuning"
YOSINSKI = "Yosinski et al. 2014, How transferable are features in deep neural networks? (NeurIPS)"
KAPLAN_CHINCHILLA = ("Kaplan et al. 2020, Scaling Laws for Neural Language Models; Hoffmann et al. 2022, "
                     "Training Compute-Optimal LLMs (Chinchilla)")
HERNANDEZ = "Hernandez et al. 2021, Scaling Laws for Transfer (arXiv 2102.01293)"
TENNEY = "Tenney et al. 2019, BERT Rediscovers the Classical NLP Pipeline (ACL)"

SMALL = "a 135M-parameter model and a few thousand tokens of a templated task"

ANCHORS: dict[str, Anchor] = {
    # ---------------------------------------------------------------- the gap experiment
    "lora_params_share": Anchor(
        HU, "abstract", "on GPT-3 175B, LoRA cuts trainable parameters by 10,000x and GPU memory by 3x",
        True,
        "tunegap agrees: a small share of the parameters is trained; the share here is far larger than Hu's "
        "because rank r on a width-d matrix trains 2r/d of it, and d is 576 here against 12,288 in GPT-3.",
        "tunegap differs only in degree: the share grows as width shrinks (2r/d of each adapted matrix), so a "
        "576-wide model cannot reach GPT-3's 10,000x at the same rank."),
    "lora_close_to_full": Anchor(
        SCHULMAN, "main results (supervised fine-tuning)",
        "LoRA matches full fine-tuning on small-to-medium instruction and reasoning datasets, in a low-regret "
        "regime that ends when the data exceeds LoRA's capacity; Biderman et al. 2024 find LoRA learns less on "
        "code and math, most of all in continued pretraining", True,
        "tunegap agrees: a short templated task sits well inside the low-regret regime, where the data's "
        "information is far below what a rank-8 adapter can hold.",
        "tunegap differs from Schulman's low-regret finding and sides with Biderman et al. here; at "
        f"{SMALL} one seed's noise and an untuned learning-rate ratio can decide this rule, so check the "
        "interval and the learning rates before reading it."),
    "gap_axes": Anchor(
        HU, "abstract (parameters, memory); Hoffmann et al. 2022 (tokens)",
        "LoRA: 10,000x fewer trainable parameters and 3x less GPU memory than full fine-tuning of GPT-3 175B; "
        "compute-optimal pretraining uses about 20 tokens per parameter (Chinchilla)", True,
        "tunegap agrees in direction: every axis shrinks by at least an order of magnitude; on a 135M model "
        "the parameter axis is smaller than Hu's because LoRA's share grows as width shrinks.",
        "tunegap differs where an axis falls outside 10-100x: a small model overtrained far past 20 tokens per "
        "parameter (SmolLM2-135M saw about 2T tokens) makes the token axis much larger than the essay's range."),
    "gap_total": Anchor(
        KAPLAN_CHINCHILLA, "Kaplan: training compute C = 6ND; Chinchilla: ~20 tokens per parameter",
        "training compute is about 6 x parameters x tokens, so the gap is the token ratio times a per-token "
        "factor close to 1", True,
        "tunegap agrees: the total is the token ratio (pretraining tokens over fine-tuning tokens) times a "
        "per-token FLOP ratio near 1, exactly as C = 6ND predicts.",
        "tunegap differs only if the fine-tune spends a large share of the pretraining token count, which a "
        "small budget never does; check the token counts."),
    "pretraining_builds": Anchor(
        HERNANDEZ, "abstract and fits of effective data transferred",
        "pretraining acts like extra fine-tuning data ('effective data transferred'), worth most when the "
        "fine-tuning data is small; Yosinski et al. 2014 find transferred features help even after fine-tuning",
        True,
        "tunegap agrees: with a few thousand tokens the random start cannot approach the pretrained one, the "
        "small-data end where Hernandez et al. find transfer worth the most.",
        "tunegap differs: with so few steps both arms may still be near their starting loss, so the budget, "
        "not the claim, can decide this; a longer budget or a harder task would separate them."),
    "icl_break_even": Anchor(
        HU, "abstract; Brown et al. 2020 (GPT-3) for the few-shot setting",
        "a merged LoRA adds no inference latency (Hu), while in-context examples are paid for in the prompt "
        "of every query (Brown et al.)", True,
        "tunegap agrees: prompting costs nothing up front and pays per query, so a break-even query count exists.",
        "tunegap differs where longer prompts cost no more per query, which only happens when the shots are "
        "cached or the k-shot arm equals the zero-shot one.",
        neutral="tunegap agrees: prompting costs nothing up front and pays per query while a fine-tune pays once, "
                "so the answer is a break-even query count rather than a yes/no."),
    # ---------------------------------------------------------------- rank
    "rank_low": Anchor(
        BIDERMAN, "abstract and spectral analysis of the full fine-tuning update",
        "full fine-tuning learns weight perturbations with a rank 10-100x greater than typical LoRA "
        "configurations (Llama-2-7B, code and math)", False,
        "tunegap agrees with Biderman et al.: the update needs far more than the LoRA ranks in use to hold 90% "
        "of its energy, even on a small task.",
        f"tunegap differs from Biderman et al.: on {SMALL}, with far fewer steps than their billions of tokens, "
        "the update has not spread into many directions; a longer run may well reverse this."),
    "rank_structured": Anchor(
        HU, "Sec. 7, understanding the low-rank updates; Aghajanyan et al. 2020, abstract",
        "the adaptation matrix has a very low intrinsic rank (Hu); 200 parameters projected into RoBERTa's space "
        "reach 90% of full fine-tuning's performance on MRPC (Aghajanyan)", True,
        "tunegap agrees: the update's spectrum is more concentrated than both nulls, a structured change "
        "rather than noise.",
        "tunegap differs: the update is spread like the null, which on a short run can mean the optimiser's "
        "per-coordinate noise (AdamW) dominates what the task has written so far."),
    "embedding_rows": Anchor(
        BIDERMAN, "spectral analysis (they analyse the transformer's weight matrices)",
        "the rank analysis covers the transformer's weight matrices; token embeddings are not what LoRA adapts "
        "by default", True,
        "tunegap agrees that the embedding update is best read apart: only the rows of tokens seen in training "
        "move, so its rank is bounded by the vocabulary the task uses.",
        "tunegap differs: the seen rows' update is not concentrated, which a task using few distinct tokens "
        "with different gradients can cause."),
    # ---------------------------------------------------------------- sweep
    "sweep_rank_close": Anchor(
        SCHULMAN, "rank sweeps, supervised learning",
        "LoRA of modest rank matches full fine-tuning until the dataset exceeds its capacity; with the optimal "
        "learning rate about 10x full fine-tuning's", True,
        "tunegap agrees: this small task is within a low rank's capacity, Schulman's low-regret regime.",
        "tunegap differs: at this budget a fixed learning-rate pair, not capacity, may be what separates the "
        "ranks; Schulman find LoRA's best rate about 10x full fine-tuning's, so an untuned ratio costs LoRA."),
    "sweep_style": Anchor(
        SCHULMAN, "supervised learning results", "LoRA matches full fine-tuning on instruction-following "
        "datasets of small to medium size", True,
        "tunegap agrees: house style is a small amount of information, well inside a low rank's capacity.",
        "tunegap differs: on a handful of generated tickets per arm one or two replies decide this rule, so "
        "it may be noise at this sample size."),
    "sweep_compute": Anchor(
        SCHULMAN, "compute analysis", "LoRA takes about two thirds of full fine-tuning's compute per pass "
        "(it skips the weight gradient of frozen matrices); Hu et al. 2021: 3x less GPU memory on GPT-3", True,
        "tunegap agrees: the per-token FLOPs stay within the same order as full fine-tuning's while parameters "
        "and optimizer state shrink by orders of magnitude.",
        "tunegap differs: the counted FLOPs dropped below half of full's, which a formula that omits the "
        "frozen weights' gradients, or a model dominated by frozen embeddings, can produce."),
    # ---------------------------------------------------------------- convergence and probes
    "convergence": Anchor(
        HERNANDEZ, "abstract", "pretraining is worth an effective amount of fine-tuning data that grows with "
        "model size and matters most in the low-data regime", True,
        "tunegap agrees: from random weights the same data and steps leave the loss far higher.",
        "tunegap differs: the budget may be too short for either arm to reach the target, in which case the "
        "ratio is extrapolated and the rule cannot resolve it; a longer budget would."),
    "probe_features": Anchor(
        TENNEY, "abstract (edge probing across BERT's layers)",
        "linguistic information is linearly decodable from a frozen pretrained model's layers, in the order "
        "of the classical pipeline", True,
        "tunegap agrees: the task's features are decodable from the frozen model.",
        "tunegap differs: the task's features were not decodable above the bar, which a small model or a "
        "probe trained on few examples can cause."),
    "probe_depth": Anchor(
        TENNEY, "abstract; Yosinski et al. 2014 (general lower layers, specific upper layers)",
        "syntactic information appears earlier in the network and semantic information later; context-"
        "dependent features need depth", True,
        "tunegap agrees: the agreement feature, which needs context, is decodable only after some layers.",
        "tunegap differs: depth did not add the contextual feature here, which a small model may lack."),
    # ---------------------------------------------------------------- forgetting
    "lora_forgets_less": Anchor(
        BIDERMAN, "abstract; learning-forgetting trade-off analysis",
        "LoRA better maintains the base model's performance on tasks outside the target domain than full "
        "fine-tuning, while learning less of the target domain", True,
        "tunegap agrees: at equal task loss, LoRA drifted less from the base model.",
        "tunegap differs: at equal task loss LoRA drifted as much or more; Biderman et al. also read much of "
        "LoRA's advantage as a consequence of learning less, which an equal-quality comparison removes."),
    "freeze_forgets_less": Anchor(
        YOSINSKI, "abstract (transferability by layer)",
        "lower layers hold general features and upper layers task-specific ones, so keeping lower layers fixed "
        "keeps what is general", True,
        "tunegap agrees: freezing most layers left the model closer to its base at equal task quality.",
        "tunegap differs: the few trainable layers had to move further to reach the same task quality, "
        "drifting as much as a full fine-tune."),
    # ---------------------------------------------------------------- knowledge
    "retrieval_beats_ft": Anchor(
        OVADIA, "abstract", "retrieval-augmented generation consistently outperforms unsupervised fine-tuning "
        "for knowledge injection, for both existing and new knowledge; several paraphrases of each fact help "
        "fine-tuning", True,
        "tunegap agrees: retrieving the statement beats fine-tuning it in.",
        "tunegap differs: fine-tuning on one statement per fact did as well as retrieval, which a tiny fact set "
        "memorised verbatim or a weak retriever can cause."),
    "ft_disturbs": Anchor(
        BIDERMAN, "abstract (forgetting outside the target domain)",
        "fine-tuning degrades performance outside the target domain, full fine-tuning more than LoRA", True,
        "tunegap agrees: fine-tuning facts in moved unrelated behaviour, while retrieval leaves the weights alone.",
        "tunegap differs: the fine-tune moved unrelated behaviour too little to count, which a short run on "
        "few facts can cause."),
    # ---------------------------------------------------------------- the learning-forgetting plane (analyze plane)
    "plane_lora_matches": Anchor(
        SCHULMAN, "main results (supervised learning) and the learning-rate comparison",
        "LoRA matches full fine-tuning's loss in a low-regret regime of small-to-medium datasets (and RL), when "
        "its learning rate is about 10x full fine-tuning's; Biderman et al. 2024 find LoRA learns less on code "
        "and math at scale", True,
        "tunegap agrees: a few hundred short examples sit inside Schulman's low-regret regime, and the LoRA "
        "learning rates tried here are 10x full's.",
        "tunegap differs from Schulman and sides with Biderman et al.: at a few steps on a small model, the best "
        "learning rate of either method may lie outside the two tried, so check the arms' curves before reading "
        "this as LoRA's capacity."),
    "plane_forgets_less": Anchor(
        BIDERMAN, "learning-forgetting trade-off figure (target-domain score against source-domain forgetting)",
        "LoRA and full fine-tuning lie on roughly the same learning-forgetting curve; LoRA sits at less learning "
        "and less forgetting, so it forgets less mainly because it learns less", False,
        "tunegap agrees: at the same test loss LoRA did not forget less than full fine-tuning, as one shared "
        "trade-off curve predicts.",
        "tunegap differs: at the same test loss LoRA forgot less, which a few-step run can cause when full "
        "fine-tuning's larger update moves directions the task does not need (its curve bends up early)."),
}


def anchor(key: str, supported: bool | None) -> dict:
    """The published counterpart of verdict `key`, as the report shows it beside a verdict with this outcome."""
    return ANCHORS[key].beside(supported)


__all__ = ["Anchor", "ANCHORS", "anchor"]
