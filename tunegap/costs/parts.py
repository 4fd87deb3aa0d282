"""What a parameter-efficient method adds to a model, in terms the cost formulas can walk without its name.

A method describes itself as a tuple of `Part`s. Each part says where it sits (a layer and a site), how
it composes with the base computation (its `kind`), which tensors it trains and which matmuls it adds.
`flops.py` and `memory.py` loop over parts by kind and site, so a new method that fits these kinds needs
no edit under `costs/`; one that does not gets a `PartError` instead of silently wrong numbers.

Kinds, with the published methods they describe:
  PARALLEL      a trained chain of matmuls beside a base matrix, added to its output (LoRA: h = W0·x + B·A·x,
                Hu et al. 2021, Eq. 3); it reads the matrix's input, on every token the matrix sees.
  SERIAL        a trained chain after a site, with a residual inside (Houlsby et al. 2019, Fig. 2:
                x + up(act(down(x))) after the MLP).
  SCALE_OUTPUT  a trained vector multiplying a matrix's output elementwise (IA3's l_k, l_v, Liu et al. 2022,
                Sec. 3.3); no matmul.
  SCALE_INPUT   the same on a matrix's input (IA3's l_ff, which scales the down projection's input).
  POSITIONS     trained sequence positions: at site "input" they are prepended to the embeddings, so the
                blocks see more queries and keys (prompt tuning, Lester et al. 2021); at site "kv" they are
                extra keys and values in the attention of `layer` (None: every layer; prefix tuning, Li &
                Liang 2021).

Any part may also run `per_call` matmuls (`CallMatmul`): work done once per forward call whatever the token
count, such as rebuilding a weight from trained factors (LoHa's (B1·A1) ⊙ (B2·A2), Hyeon-Woo et al. 2022,
Eq. 2) or DoRA's column norm of W0 + B·A (Liu et al. 2024, Eq. 5).
"""

from __future__ import annotations

from dataclasses import dataclass

PARALLEL = "parallel"
SERIAL = "serial"
SCALE_OUTPUT = "scale_output"
SCALE_INPUT = "scale_input"
POSITIONS = "positions"

MATRIX_SITES = ("q", "k", "v", "o", "gate", "up", "down")
# The sites each kind may sit at: the ones the formulas know how to cost.
SITES = {PARALLEL: MATRIX_SITES, SCALE_OUTPUT: MATRIX_SITES, SCALE_INPUT: MATRIX_SITES,
         SERIAL: ("mlp_out",), POSITIONS: ("input", "kv")}
MATMUL_KINDS = (PARALLEL, SERIAL)


class PartError(ValueError):
    """A part the cost formulas cannot describe (unknown kind, a site its kind cannot sit at, ...)."""


@dataclass(frozen=True)
class Tensor:
    """One trained tensor of a part: rows x cols, stored `copies` times (one per MoE expert it adapts)."""

    name: str
    rows: int
    cols: int = 1
    copies: int = 1

    @property
    def numel(self) -> int:
        return self.rows * self.cols * self.copies


@dataclass(frozen=True)
class Matmul:
    """A matmul a part adds, (fan_in x fan_out) per token at its site; its weight always trains."""

    fan_in: int
    fan_out: int


@dataclass(frozen=True)
class CallMatmul:
    """A matmul a part runs once per forward call, whatever the token count: (rows x inner) @ (inner x cols).

    grads: how many of its two operands get a gradient (0: its result is detached, as DoRA's weight-norm input;
    2: both are trained factors, as LoHa's w1_a @ w1_b), each an (rows x inner x cols) matmul in backward.
    recomputed: the backward runs the product again (an autograd Function that saves only the factors, as
    PEFT's `HadaWeight`): hardware work, counted in `Flops.recompute`.
    """

    rows: int
    inner: int
    cols: int
    grads: int = 0
    recomputed: bool = False

    def __post_init__(self):
        if self.grads not in (0, 1, 2):
            raise PartError(f"part: a per-call matmul has 0, 1 or 2 operands with a gradient, not {self.grads}")


@dataclass(frozen=True)
class Part:
    """One piece a method adds: where it sits, how it composes, what it trains and which matmuls it runs.

    layer: block index, or None for a part outside the blocks (prompt table) or shared by all (prefix table).
    site: a base matrix ("q".."down"), "mlp_out" (the MLP's output, before the residual add), "input"
    (the embeddings' output) or "kv" (the attention's keys and values).
    matmuls: the chain in execution order (PARALLEL and SERIAL only); the first reads the site's input.
    positions: sequence positions a POSITIONS part adds.
    per_call: `CallMatmul`s run once per forward call (in execution order, before the per-token chain).
    weight_per_call: the first matmul's weight is built by the per-call matmuls (LoHa's ΔW), not a trained
    tensor; that matmul keeps it, rows x cols per call, wherever its input needs a gradient.
    """

    kind: str
    layer: int | None
    site: str
    tensors: tuple = ()
    matmuls: tuple = ()
    positions: int = 0
    per_call: tuple = ()
    weight_per_call: bool = False

    def __post_init__(self):
        if self.kind not in SITES:
            raise PartError(f"part: unknown kind {self.kind!r}; choose from {', '.join(SITES)}")
        if self.site not in SITES[self.kind]:
            raise PartError(f"part: a {self.kind} part cannot sit at {self.site!r}; "
                            f"the formulas cost it at {', '.join(SITES[self.kind])}")
        if (self.kind in MATMUL_KINDS) != bool(self.matmuls):
            raise PartError(f"part: a {self.kind} part {'needs' if self.kind in MATMUL_KINDS else 'adds no'} matmuls")
        if self.kind in MATMUL_KINDS and any(a.fan_out != b.fan_in for a, b in zip(self.matmuls, self.matmuls[1:])):
            raise PartError(f"part: the matmuls of a {self.kind} part must chain (each fan_out = next fan_in)")
        if self.per_call and self.kind not in MATMUL_KINDS:
            raise PartError(f"part: a {self.kind} part runs no per-call matmuls (the formulas cost them beside a "
                            f"chain: {', '.join(MATMUL_KINDS)})")
        if self.weight_per_call and not self.per_call:
            raise PartError("part: a weight built per call needs the per-call matmuls that build it")
        if (self.kind == POSITIONS) != (self.positions > 0):
            raise PartError("part: positions > 0 exactly for POSITIONS parts")

    @property
    def numel(self) -> int:
        return sum(t.numel for t in self.tensors)

    @property
    def inner_width(self) -> int:
        """Width of what runs between the chain's matmuls (LoRA's rank): the inputs of every matmul but the first."""
        return sum(m.fan_in for m in self.matmuls[1:])

    def sort_key(self) -> tuple:
        return (self.layer is None, self.layer or 0, self.site, self.kind)
