"""``CaSCLAConfig``: every width, rank and weight of the model, with the paper's
values as defaults (``../shared/spec/model.md`` maps each to an equation)."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

from .modalities import MODALITIES


#: The classifier losses ``CaSCLAConfig.classifier_loss`` may name.
CLASSIFIER_LOSSES = ("ce", "weighted_ce", "focal", "logit_adjusted")
#: Where the adversarial perturbation's norm epsilon is taken (``CaSCLAConfig.ast_norm``).
AST_NORMS = ("dialogue", "utterance", "weights")
#: How the adversarial cross-entropy joins the clean one (``CaSCLAConfig.ast_ce``).
AST_CE = ("sum", "mean")
#: The contrastive losses ``CaSCLAConfig.contrastive`` may name.
CONTRASTIVE_LOSSES = ("scla", "supcon", "spcl")


@dataclass
class CaSCLAConfig:
    """Configuration of :class:`cascla_ext.CaSCLA`.

    Widths follow the paper (d_m = 1024, d_h = 300) unless given; ``small()``
    gives a CPU-friendly variant. ``input_dims`` (modality -> feature width)
    and ``clue_dim`` come from the data; ``num_classes`` from its labels.
    """

    # data
    num_classes: int = 7
    modalities: tuple[str, ...] = ("t", "a", "v")
    input_dims: dict[str, int] = field(default_factory=lambda: {"t": 1024, "a": 1582, "v": 342})
    clue_dim: int = 1024
    # unimodal encoders (Eq. 1): Linear(d_in -> d_m) + a Transformer encoder
    d_model: int = 1024
    encoder_layers: int = 1
    encoder_heads: int = 8
    encoder_ff: int = 2048
    # fusion (Eqs. 2-6): ring ranks per modality, eta, common width d_x
    ranks: dict[str, int] = field(default_factory=lambda: {"t": 16, "a": 16, "v": 16})
    eta: float = 0.5
    d_fused: int = 1024
    # Gain on the fused x (and the textual view) before the GRU. Eq. 6 as read
    # gives terms of norm <= 1, entries ~ 1/sqrt(d_x): too small for the GRU
    # to learn from at the paper's learning rate. None = sqrt(d_fused), which
    # gives entries of order 1; 1.0 is the literal Eq. 6.
    fusion_gain: float | None = None
    # context (Eq. 7) and causal interaction (Eqs. 8-9)
    d_hidden: int = 300          # d_h, per GRU direction
    d_feature: int = 600         # d, the width of f_i (and of the label embeddings)
    # adversarial samples (Eqs. 19-20): rho = epsilon * g / ||g||, the norm
    # over each dialogue and GRU direction (ast_norm "dialogue", the paper's
    # reading) or over each utterance's gate pre-activations ("utterance": the
    # same strength per utterance however long the dialogue) or, "weights",
    # SACL's reading (FGM on the GRU's input weights): rho = dW x + db with
    # dW, db = epsilon * the clean loss's gradient at W_ih, b_ih over its norm,
    # one change of the weights for the whole batch and every step (so a much
    # smaller epsilon than the other two: ||rho_t|| grows with ||x_t||);
    # ast_weight is the weight of the adversarial cross-entropy in Eq. 21
    # (paper: 1). ast_ce: "sum" adds it to the clean one (Eq. 21 as written:
    # with AST on, the classifier's loss weighs 1 + ast_weight against the
    # contrastive term's lambda), "mean" averages the two, (CE + w CE_adv) /
    # (1 + w), so that switching AST on leaves the classifier's weight at 1.
    epsilon: float = 1.0
    ast_norm: str = "dialogue"
    ast_weight: float = 1.0
    ast_ce: str = "sum"
    # SCLA (Eqs. 10-18) and the objective (Eq. 21)
    alpha: float = 2.0
    beta: float = 0.5
    gamma: float = 1.0
    scla_weight: float = 1.0     # lambda
    # How Eq. 18 is scaled: "balanced" (class weights normalised to mean 1 over
    # the batch, each anchor's loss averaged over its 1 + P views: the term
    # stays near the cross-entropy's scale, so lambda = 1 works) or "literal"
    # (Eq. 18 as written: ~25-35x the cross-entropy on MELD-like labels).
    # docs/objective.md has the numbers.
    scla_normalization: str = "balanced"
    # The classifier's loss (the CE terms of Eq. 21, clean and adversarial):
    # "ce" (the paper's), "weighted_ce" (class weights (1 / prior)^class_weight_power,
    # normalised to mean 1 under the prior), "focal" (Lin et al., focal_gamma),
    # or "logit_adjusted" (Menon et al.: CE of logits + logit_adjust_tau * log prior,
    # the balanced softmax at tau 1; predictions use the plain logits).
    # class_prior: the training split's label frequencies (set from the data).
    classifier_loss: str = "ce"
    class_prior: tuple[float, ...] | None = None
    class_weight_power: float = 0.5
    focal_gamma: float = 2.0
    logit_adjust_tau: float = 1.0
    label_embedding_dim: int = 300
    label_dropout: float = 0.1
    dropout: float = 0.1
    # ablations (paper Table 4)
    use_scla: bool = True
    # Which contrastive loss the use_scla term is (weighted by scla_weight):
    # "scla" (the paper's), or the alternatives of its Table 5, "supcon"
    # (Khosla et al.) and "spcl" (an SPCL-style prototype loss), both with
    # contrastive_temperature. cascla_ext/nn/contrastive.py has their math.
    contrastive: str = "scla"
    contrastive_temperature: float = 0.1
    use_ast: bool = True
    # Whether the adversarial features are also an extra positive view of
    # the contrastive term (the paper's Eq. 17: yes); False keeps AST to its
    # cross-entropy.
    ast_view: bool = True
    use_causal: bool = True
    use_text_augmentation: bool = True
    # "fused" (C++/CUDA ops) or "reference" (pure-PyTorch twins, for debugging)
    ops_backend: str = "fused"

    def __post_init__(self) -> None:
        # Normalisation happens here, once; validate() only checks.
        self.modalities = tuple(self.modalities)
        if self.class_prior is not None:
            try:
                self.class_prior = tuple(float(p) for p in self.class_prior)
            except (TypeError, ValueError):
                pass  # validate() says what is wrong with it
        if self.use_text_augmentation and "t" not in self.modalities:
            self.use_text_augmentation = False  # no text branch to augment with
        self.validate()

    def validate(self) -> None:
        """Check every field; a ValueError naming the first bad one. Changes nothing."""

        def fail(msg: str) -> None:
            raise ValueError(f"CaSCLAConfig: {msg}")

        for name in ("eta", "fusion_gain", "epsilon", "alpha", "beta", "gamma", "scla_weight", "dropout",
                     "label_dropout", "class_weight_power", "focal_gamma", "logit_adjust_tau",
                     "contrastive_temperature", "ast_weight"):
            value = getattr(self, name)
            if value is None and name == "fusion_gain":
                continue
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                fail(f"{name} must be a finite number, got {value!r}")
        for name in ("num_classes", "d_model", "d_fused", "d_hidden", "d_feature", "clue_dim",
                     "label_embedding_dim", "encoder_layers", "encoder_heads", "encoder_ff"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                fail(f"{name} must be an integer, got {value!r}")
        for name in (f.name for f in dataclasses.fields(self) if f.type in (bool, "bool")):
            value = getattr(self, name)
            if not isinstance(value, bool):  # a 0/1 or a "false" from a hand-written file would pass as truthy
                fail(f"{name} must be true or false, got {value!r}")
        if not self.modalities:
            fail("modalities must be a non-empty subset of t, a, v")
        for m in self.modalities:
            if m not in MODALITIES:
                fail(f"unknown modality {m!r} in modalities (expected t, a or v)")
            if m not in self.input_dims or self.input_dims[m] < 1:
                fail(f"input_dims has no positive width for modality {m!r}")
            if m not in self.ranks or self.ranks[m] < 1:
                fail(f"ranks has no positive rank for modality {m!r}")
        if len(set(self.modalities)) != len(self.modalities):
            fail(f"modalities has duplicates: {self.modalities}")
        if self.num_classes < 2:
            fail(f"num_classes must be >= 2, got {self.num_classes}")
        for name in ("d_model", "d_fused", "d_hidden", "clue_dim", "label_embedding_dim",
                     "encoder_layers", "encoder_heads", "encoder_ff"):
            if getattr(self, name) < 1:
                fail(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.d_feature < 2:
            fail(f"d_feature must be >= 2 (soft-HGR covariances), got {self.d_feature}")
        if self.d_model % self.encoder_heads:
            fail(f"d_model ({self.d_model}) must be divisible by encoder_heads ({self.encoder_heads})")
        if self.fusion_gain is not None and not self.fusion_gain > 0:
            fail(f"fusion_gain must be > 0 (or None for sqrt(d_fused)), got {self.fusion_gain}")
        if not 0.0 <= self.eta <= 1.0:
            fail(f"eta must be in [0, 1], got {self.eta}")
        for name in ("dropout", "label_dropout"):
            if not 0.0 <= getattr(self, name) < 1.0:
                fail(f"{name} must be in [0, 1), got {getattr(self, name)}")
        for name in ("epsilon", "alpha", "beta", "gamma", "scla_weight"):
            if getattr(self, name) < 0:
                fail(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.ast_norm not in AST_NORMS:
            fail(f"ast_norm must be one of {', '.join(AST_NORMS)}, got {self.ast_norm!r}")
        if self.ast_ce not in AST_CE:
            fail(f"ast_ce must be one of {', '.join(AST_CE)}, got {self.ast_ce!r}")
        if self.ast_weight < 0:
            fail(f"ast_weight must be >= 0, got {self.ast_weight}")
        if self.contrastive not in CONTRASTIVE_LOSSES:
            fail(f"contrastive must be one of {', '.join(CONTRASTIVE_LOSSES)}, got {self.contrastive!r}")
        if not self.contrastive_temperature > 0:
            fail(f"contrastive_temperature must be > 0, got {self.contrastive_temperature}")
        if self.classifier_loss not in CLASSIFIER_LOSSES:
            fail(f"classifier_loss must be one of {', '.join(CLASSIFIER_LOSSES)}, got {self.classifier_loss!r}")
        if self.class_prior is not None:
            prior = self.class_prior
            if not isinstance(prior, (list, tuple)) or not all(
                    isinstance(p, (int, float)) and not isinstance(p, bool) for p in prior) \
                    or len(prior) != self.num_classes or not all(math.isfinite(p) and p >= 0 for p in prior) \
                    or not sum(prior) > 0:
                fail(f"class_prior must hold {self.num_classes} finite frequencies >= 0 (not all 0), "
                     f"got {self.class_prior}")
        elif self.classifier_loss in ("weighted_ce", "logit_adjusted"):
            fail(f"classifier_loss {self.classifier_loss!r} needs class_prior (the training labels' "
                 "frequencies; CaSCLAConfig.for_corpus and the CLI set it)")
        for name in ("class_weight_power", "focal_gamma", "logit_adjust_tau"):
            if getattr(self, name) < 0:
                fail(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.scla_normalization not in ("literal", "balanced"):
            fail(f"scla_normalization must be 'literal' or 'balanced', got {self.scla_normalization!r}")
        if self.ops_backend not in ("fused", "reference"):
            fail(f"ops_backend must be 'fused' or 'reference', got {self.ops_backend!r}")

    @classmethod
    def small(cls, **overrides) -> CaSCLAConfig:
        """Widths for CPU runs (the built-in synthetic dataset, tests): the ``small`` preset."""
        from .presets import config_for

        return config_for("small", **overrides)

    @classmethod
    def base(cls, **overrides) -> CaSCLAConfig:
        """Widths for real datasets on a CPU (MELD or IEMOCAP in minutes per
        seed): the ``base`` preset, a quarter of the paper's d_m, d_h 128, the
        paper's ring ranks."""
        from .presets import config_for

        return config_for("base", **overrides)

    @classmethod
    def for_corpus(cls, corpus, preset: str | None = None, **overrides) -> CaSCLAConfig:
        """The config of a model for ``corpus``: the widths of ``preset``
        (``small``, ``base`` or ``paper``; None: the corpus's default,
        :func:`cascla_ext.presets.default_widths`), then ``overrides``
        (CaSCLAConfig fields), then what the data decides: ``num_classes``,
        ``input_dims`` and ``clue_dim`` from the corpus, ``class_prior`` from
        its training split. ``modalities`` (default: every one the corpus
        has, in ring order) must be ones the corpus has features for. The
        one place a model's config is derived from its data (the CLI, tune
        and tools/reproduce_results.py call it)."""
        from .presets import config_for, default_widths

        modalities = corpus.pick_modalities(overrides.pop("modalities", None))
        values = {**overrides, **corpus.config_fields(modalities)}
        return config_for(preset or default_widths(corpus.name), **values)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> CaSCLAConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"CaSCLAConfig: unknown fields {unknown}")
        return cls(**values)
