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
        OVADIA, "abstract; results on their current-events (new knowledge) task",
        "retrieval-augmented generation consistently outperformed unsupervised fine-tuning for knowledge "
        "injection (accuracy on multiple-choice questions), both for knowledge the model saw in pretraining and "
        "for entirely new knowledge", True,
        "tunegap agrees: retrieving the statement answered more new facts than the best fine-tune.",
        "tunegap differs: the best fine-tune answered as many new facts as retrieval, which a small fact set "
        "trained to memorisation, or a weak retriever or reader at 135M parameters, can cause."),
    "ft_disturbs": Anchor(
        BIDERMAN, "abstract (forgetting outside the target domain)",
        "fine-tuning degrades performance outside the target domain, full fine-tuning more than LoRA", True,
        "tunegap agrees: fine-tuning facts in moved unrelated behaviour, while retrieval leaves the weights alone.",
        "tunegap differs: the fine-tune moved unrelated behaviour too little to count, which a short run on "
        "few facts can cause."),
    # ---------------------------------------------------------------- sweep noise, knowledge paraphrases
    "noise_costs_compute": Anchor(
        "Zhou et al. 2023, LIMA: Less Is More for Alignment (NeurIPS)",
        "Sec. 5, ablations on data diversity, quality and quantity (7B models)",
        "2,000 quality-filtered Stack Exchange examples scored about 0.5 points higher (1-6 Likert, graded by "
        "ChatGPT) than 2,000 unfiltered ones, while growing the filtered set up to 16-fold left the score "
        "flat: quality mattered more than quantity", True,
        "tunegap agrees: the quality lost to mismatched replies exceeded what doubling the steps bought back "
        "(LIMA's quantity is more data at 7B; ours is more compute on the same data at 135M).",
        "tunegap differs: doubling the steps bought back more than the noise removed; a short run of a small "
        "model is far from converged, so compute still buys much, and a mismatched reply in the task's own "
        "format still teaches the format."),
    "noise_hurts": Anchor(
        "Song et al. 2022, Learning From Noisy Labels With Deep Neural Networks: A Survey (IEEE TNNLS)",
        "abstract and Sec. I",
        "deep networks have the capacity to memorise noisy labels entirely sooner or later in training, which "
        "degrades generalisation to clean test data", True,
        "tunegap agrees: training on mismatched replies raised the loss on the clean test split.",
        "tunegap differs: mismatched replies did not raise the test loss here; a few dozen steps may stop long "
        "before the noise is memorised (the survey's early-learning phase fits clean patterns first)."),
    "paraphrases_help_ft": Anchor(
        OVADIA, "abstract; their paraphrase (repetition) experiment on the current-events task",
        "language models struggle to learn new factual information through unsupervised fine-tuning, and "
        "exposing them to numerous variations (paraphrases) of the same fact during training could alleviate "
        "this; in their paraphrase experiment accuracy on new facts rose with the number of paraphrases", True,
        "tunegap agrees: ten wordings of each fact taught the fine-tune more than one, at equal compute.",
        "tunegap differs: ten wordings did not beat one; at equal compute each wording is seen fewer times, and "
        "a small model may memorise the surface text of one wording rather than the fact (Ovadia et al. "
        "fine-tune on more data as paraphrases are added, unsupervised on raw text; this fine-tune is "
        "supervised on question-statement pairs)."),
    # ---------------------------------------------------------------- rank grid (analyze rank --steps-list/--lrs)
    "rank_grows_with_training": Anchor(
        BIDERMAN, "spectral analysis of the full fine-tuning perturbation at checkpoints through training",
        "the rank needed to explain the full fine-tuning perturbation is 10-100x typical LoRA ranks and does "
        "not shrink as training goes on (Llama-2-7B, billions of tokens of code and math)", True,
        "tunegap agrees: the update needs more directions after more steps, the direction Biderman et al. "
        "describe over far longer runs.",
        "tunegap differs: more steps did not spread the update into more directions here; over a few dozen "
        "steps the first directions may still be growing, and the spread Biderman et al. see takes far longer."),
    # ---------------------------------------------------------------- sweep lr and sweep freeze (lr_sweep, freeze_sweep)
    "lora_lr_ratio": Anchor(
        SCHULMAN, "learning-rate sweeps of LoRA and full fine-tuning (supervised learning)",
        "the optimal LoRA learning rate is about 10x full fine-tuning's, consistently across the models and "
        "datasets they sweep (LoRA alpha = 32 with 1/r scaling: the optimum barely moves with rank)", True,
        "tunegap agrees: on a half-decade grid each method's best validation loss sits about a decade apart; "
        "at rank 16 our alpha = 2r is their alpha = 32, so the parametrisations match.",
        "tunegap differs: the best rates are not about a decade apart here; with a few dozen steps the short "
        "warm-up and cosine decay, not the parametrisation, can decide which rate wins, and a small grid "
        "only brackets the optimum to a factor of about 3."),
    "lora_gap_at_best_lr": Anchor(
        SCHULMAN, "supervised learning results with each method's learning rate tuned",
        "with its own best learning rate, LoRA's loss matches full fine-tuning's on small-to-medium datasets "
        "(the low-regret regime); Biderman et al. 2024 find LoRA behind on code and math at larger scale", True,
        "tunegap agrees: once each method has its own best rate, LoRA's test loss is within 5% of full "
        "fine-tuning's; a small task is well inside a rank-16 adapter's capacity.",
        "tunegap differs: even at its best rate LoRA stays more than 5% behind; in a few dozen steps full "
        "fine-tuning moves every weight while LoRA starts from a zero update, so a short budget favours full "
        "fine-tuning more than Schulman's long runs do."),
    "freeze_transfer": Anchor(
        YOSINSKI, "Fig. 2 (AnB: the first n of 8 layers transferred and frozen, the rest trained)",
        "frozen transferred layers cost little while n is small; freezing more (n = 4-7) loses accuracy, "
        "from fragile co-adaptation in the middle and task-specific features at the top; for transformers, "
        "Lee et al. 2019 (What Would Elsa Do?, arXiv 1911.03090) keep about 90% of BERT's fine-tuned quality "
        "training only the top quarter of layers, a loss of about 10%", False,
        "tunegap agrees: freezing three quarters of the blocks cost more than the threshold, as Yosinski's "
        "frozen upper layers and Lee et al.'s top-quarter fine-tunes did.",
        "tunegap differs: freezing three quarters of the blocks cost little here; a short task whose style "
        "lives near the output, and a budget of a few dozen steps in which no arm moves far, both favour a "
        "frozen bottom."),
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
        "tunegap agrees that at the same test loss LoRA did not forget less than full fine-tuning, as one shared "
        "trade-off curve predicts; where LoRA forgot more (an interval above 0), the result goes past theirs, which "
        "LoRA's larger learning rate over a few steps can cause.",
        "tunegap differs: at the same test loss LoRA forgot less, which a few-step run can cause when full "
        "fine-tuning's larger update moves directions the task does not need (its curve bends up early)."),
}


def anchor(key: str, supported: bool | None) -> dict:
    """The published counterpart of verdict `key`, as the report shows it beside a verdict with this outcome."""
    return ANCHORS[key].beside(supported)


__all__ = ["Anchor", "ANCHORS", "anchor"]
