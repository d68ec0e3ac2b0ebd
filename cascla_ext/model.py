"""``CaSCLA``: the whole method on the fused ops (paper section 3; how each
equation maps to a module: ``../shared/spec/model.md``).

    features per modality -> unimodal Transformer encoders (Eq. 1)
      -> TensorRingFusion (Eqs. 2-6)              [op: tr_attention]
      -> bidirectional PerturbedGRU (Eq. 7)       [op: perturbed_gru]
      -> CausalInteraction with the clues (Eqs. 8-9)
      -> f -> classifier (CE) and SCLALoss (Eqs. 10-18) [op: scla_loss]

Training adds the adversarial pass (AST, Eqs. 19-20: the GRU gates perturbed
along the normalised gradient of the clean loss) and the textual view (the
GRU and interaction on the text branch alone); both are extra positives of
the SCLA loss, and the adversarial pass adds its own CE (Eq. 21).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ._io import atomic_torch_save
from .config import CaSCLAConfig
from .data.batch import Batch
from .modalities import MODALITY_NAMES
from .distributed import SCOPES, all_reduce_sum, world_size
from .nn import CausalInteraction, PerturbedGRU, SCLALoss, SPCLLoss, SupConLoss, TensorRingFusion
from .nn.dropout import BatchDropout, TransformerEncoderLayer, global_batch

__all__ = ["CaSCLA", "CaSCLAOutput", "CheckpointError"]

CHECKPOINT_FORMAT = 1


class CheckpointError(ValueError):
    """A checkpoint file that cannot be used: the message names the file and what does not fit."""


@dataclass
class CaSCLAOutput:
    """logits (B, T, K); f (B, T, d) the causal-aware features; with labels,
    ``loss`` (the objective of Eq. 21) and its terms in ``losses``: only the
    terms defined for the batch (no ``scla`` with fewer than two labelled
    utterances; ``loss`` None and no terms with none)."""

    logits: Tensor
    features: Tensor
    loss: Tensor | None = None
    losses: dict[str, Tensor] = field(default_factory=dict)
    perturbation: list[Tensor] | None = None  # the adversarial rho per GRU direction (AST)
    # forward(..., grad_norms=True): the L2 norm of each weighted term's
    # gradient at the fused features x that every term shares (the balance
    # of the objective, as metrics.json records it).
    grad_norms: dict[str, float] = field(default_factory=dict)
    # Distributed (global scope): parameters that joined ``loss`` with a zero
    # gradient only so that DDP sees every parameter used; the training loop
    # sets their gradient to None after the backward, as one process leaves it.
    no_grad: list[Tensor] = field(default_factory=list)


class UnimodalEncoder(nn.Module):
    """Eq. 1: Linear(d_in -> d_m), then a Transformer encoder over the dialogue."""

    def __init__(self, d_in: int, cfg: CaSCLAConfig):
        super().__init__()
        self.proj = nn.Linear(d_in, cfg.d_model)
        # nn.TransformerEncoderLayer with the global batch's dropout masks (nn/dropout.py).
        layer = TransformerEncoderLayer(cfg.d_model, cfg.encoder_heads, cfg.encoder_ff, dropout=cfg.dropout,
                                        batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, cfg.encoder_layers, enable_nested_tensor=False)

    def forward(self, x: Tensor, mask: Tensor) -> Tensor:
        c = self.encoder(self.proj(x), src_key_padding_mask=~mask)
        return c * mask.unsqueeze(-1)


class CaSCLA(nn.Module):
    """The CaSCLA model. ``forward(batch)`` returns a :class:`CaSCLAOutput`;
    with ``batch.labels`` it includes the loss terms:

    - ``ce``: cross-entropy of the classifier on f (valid utterances);
    - ``scla``: the SCLA loss of f with the textual and adversarial views as
      extra positives (``use_scla``; with ``contrastive="supcon"`` or
      ``"spcl"`` the term is that loss instead, under its own name);
    - ``ce_adv``: cross-entropy on the adversarial features f^r (``use_ast``,
      training only).
    """

    def __init__(self, config: CaSCLAConfig, label_names: list[str] | None = None):
        super().__init__()
        config.validate()
        self.config = cfg = config
        self.label_names = list(label_names) if label_names else [str(k) for k in range(cfg.num_classes)]
        if len(self.label_names) != cfg.num_classes:
            raise ValueError(f"CaSCLA: {len(self.label_names)} label names for {cfg.num_classes} classes")
        self.encoders = nn.ModuleDict({m: UnimodalEncoder(cfg.input_dims[m], cfg) for m in cfg.modalities})
        self.fusion = TensorRingFusion({m: cfg.d_model for m in cfg.modalities}, cfg.d_fused,
                                       ranks={m: cfg.ranks[m] for m in cfg.modalities}, eta=cfg.eta,
                                       backend=cfg.ops_backend)
        self.gru = PerturbedGRU(cfg.d_fused, cfg.d_hidden, bidirectional=True, batch_first=True,
                                backend=cfg.ops_backend)
        d_context = 2 * cfg.d_hidden
        if cfg.use_causal:
            self.clue_intra = nn.Linear(3 * cfg.clue_dim, d_context)
            self.clue_inter = nn.Linear(3 * cfg.clue_dim, d_context)
            self.interaction = CausalInteraction(d_context, cfg.d_feature, cfg.d_hidden, cfg.dropout)
        else:
            self.head = nn.Linear(d_context, cfg.d_feature)
        self.fusion_gain = cfg.fusion_gain if cfg.fusion_gain is not None else cfg.d_fused ** 0.5
        self.dropout = BatchDropout(cfg.dropout, time_major=True)  # on the GRU's (T, B, .) output, transposed
        self.classifier = nn.Linear(cfg.d_feature, cfg.num_classes)
        # Per-class biases added to the logits when predicting (0 unless
        # fitted on a selection split: cascla_ext.train.fit_decision_bias).
        self.register_buffer("decision_bias", torch.zeros(cfg.num_classes))
        if cfg.class_prior is not None:
            prior = torch.tensor(cfg.class_prior, dtype=torch.float32)
            prior = prior / prior.sum()
            self.register_buffer("log_prior", prior.clamp_min(1e-12).log(), persistent=False)
            w = prior.clamp_min(1e-12) ** -cfg.class_weight_power
            self.register_buffer("class_weights", w / (w * prior).sum(), persistent=False)  # mean 1 under the prior
        # Set by distribute() for a rank of a torch.distributed run; not saved.
        self.distributed_scope: str | None = None
        if cfg.use_scla:  # the contrastive term (attribute name kept for checkpoints)
            if cfg.contrastive == "scla":
                self.scla = SCLALoss(cfg.num_classes, cfg.d_feature, embedding_dim=cfg.label_embedding_dim,
                                     dropout=cfg.label_dropout, alpha=cfg.alpha, beta=cfg.beta,
                                     gamma=cfg.gamma, normalization=cfg.scla_normalization,
                                     backend=cfg.ops_backend)
            elif cfg.contrastive == "supcon":
                self.scla = SupConLoss(temperature=cfg.contrastive_temperature)
            else:
                self.scla = SPCLLoss(cfg.num_classes, cfg.d_feature, temperature=cfg.contrastive_temperature)

    # ------------------------------------------------------------------ parts
    def check_inputs(self, input_dims: Mapping[str, int], clues: tuple[int, ...] | None) -> None:
        """That data of these feature widths (modality -> width) and clues
        (their shape's last two entries, (6, d_c), or None without clues) fits
        this model: a ValueError naming the modality or the clues otherwise.
        The one check of a model's inputs (every forward's batch, and the
        corpus ``cascla evaluate`` and ``predict`` build)."""
        cfg = self.config
        for m in cfg.modalities:
            if m not in input_dims:
                raise ValueError(f"CaSCLA: the data has no features for modality {m!r} "
                                 f"(configured: {', '.join(cfg.modalities)})")
            if input_dims[m] != cfg.input_dims[m]:
                raise ValueError(f"CaSCLA: the {MODALITY_NAMES[m]} features have width {input_dims[m]}, the "
                                 f"model expects input_dims[{m!r}] = {cfg.input_dims[m]} (features of another "
                                 "encoder or feature set than it was trained with?)")
        if cfg.use_causal:
            if clues is None:
                raise ValueError("CaSCLA: use_causal needs clue vectors in the batch (batch.clues)")
            if tuple(clues) != (6, cfg.clue_dim):
                raise ValueError(f"CaSCLA: clues of shape (..., {', '.join(map(str, clues))}), the model expects "
                                 f"(..., 6, {cfg.clue_dim}) (other clues than it was trained with?)")

    def _check_batch(self, batch: Batch) -> None:
        self.check_inputs({m: x.shape[-1] for m, x in batch.features.items()},
                          None if batch.clues is None else tuple(batch.clues.shape[-2:]))

    def _prepare_interaction(self, batch: Batch) -> tuple | None:
        """What the causal interaction needs that no view changes (projected
        clues, causal masks): computed once per forward, shared by the clean,
        adversarial and textual passes."""
        if not self.config.use_causal:
            return None
        B, T = batch.mask.shape
        clues = batch.clues.reshape(B, T, 6 * self.config.clue_dim)
        half = 3 * self.config.clue_dim
        return self.interaction.prepare(self.clue_intra(clues[..., :half]), self.clue_inter(clues[..., half:]),
                                        batch.speakers, batch.mask)

    def _context_to_features(self, x: Tensor, batch: Batch, rho: list[Tensor] | None, prepared: tuple | None
                             ) -> Tensor:
        """GRU (Eq. 7) and causal interaction (Eqs. 8-9) of fused inputs x (B, T, d_x) -> f."""
        h, _ = self.gru(x, lengths=batch.lengths, perturbation=rho)
        h = self.dropout(h)
        if not self.config.use_causal:
            return self.head(h)
        return self.interaction.apply_prepared(h, prepared)

    def _adversarial_perturbation(self, x: Tensor, grads: tuple[Tensor, ...], mask: Tensor, spread: bool
                                  ) -> list[Tensor]:
        """Eq. 20: rho_adv per GRU direction from ``grads``, the clean loss's
        gradient at its gate perturbation (B, T, 3H), scaled to norm epsilon
        where ``config.ast_norm`` says:

        - ``dialogue`` (the paper's): over each dialogue and direction;
        - ``utterance``: over each utterance, long dialogues alike;
        - ``weights`` (SACL's FGM on the GRU's input weights): rho sits on the
          gates' input side (W_ih x + b_ih + rho), so the gradient at W_ih and
          b_ih is sum_{b,t} g[b,t] x[b,t]^T and sum_{b,t} g[b,t]; each is
          scaled to norm epsilon (per tensor, as FGM does) and the change of
          the weights is applied as rho = dW x + db. In a distributed run the
          sums are over all ranks (``spread``: one all-reduce each), so the
          change is the single-process one."""
        eps, reading = self.config.epsilon, self.config.ast_norm
        out = []
        for g in grads:
            g = g.detach()
            if reading == "weights":
                g_w = torch.einsum("btg,btx->gx", g, x)
                g_b = g.sum(dim=(0, 1))
                if spread:
                    g_w, g_b = all_reduce_sum(g_w), all_reduce_sum(g_b)
                d_w = eps * g_w / g_w.norm().clamp_min(1e-12)
                d_b = eps * g_b / g_b.norm().clamp_min(1e-12)
                out.append((x @ d_w.T + d_b) * mask.unsqueeze(-1).to(x.dtype))
                continue
            if reading == "utterance":
                norm = g.norm(dim=2, keepdim=True).clamp_min(1e-12)
            else:
                norm = g.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, 1, 1)
            out.append(eps * g / norm)
        return out

    def _ce(self, f: Tensor, labels: Tensor, pick, counts: Tensor | None = None) -> Tensor:
        return self.classifier_loss(pick(self.classifier(f)), pick(labels), counts)

    def classifier_loss(self, logits: Tensor, labels: Tensor, global_counts: Tensor | None = None) -> Tensor:
        """The loss of the classifier on (N, K) logits (``config.classifier_loss``).

        ``global_counts`` (K,): the labelled utterances per class over all
        ranks of a distributed run; the loss is then world_size times this
        rank's share of the global mean (its sum over the global
        denominator), the convention that makes DDP's averaged gradient the
        single-process one (docs/distributed.md)."""
        cfg = self.config
        if global_counts is not None:
            return self._global_classifier_loss(logits, labels, global_counts)
        if cfg.classifier_loss == "ce":
            return F.cross_entropy(logits, labels)
        if cfg.classifier_loss == "logit_adjusted":
            # Menon et al. (2021): train on logits + tau * log prior, predict with the logits.
            return F.cross_entropy(logits + cfg.logit_adjust_tau * self.log_prior.to(logits.dtype), labels)
        if cfg.classifier_loss == "weighted_ce":
            return F.cross_entropy(logits, labels, weight=self.class_weights.to(logits.dtype))
        return self._focal_terms(logits, labels).mean()

    def _focal_terms(self, logits: Tensor, labels: Tensor) -> Tensor:
        """focal (Lin et al., 2017): -(1 - p_y)^gamma log p_y per sample."""
        logp = F.log_softmax(logits, dim=-1).gather(1, labels.unsqueeze(1)).squeeze(1)
        return -((1 - logp.exp()).clamp_min(0) ** self.config.focal_gamma * logp)

    def _global_classifier_loss(self, logits: Tensor, labels: Tensor, counts: Tensor) -> Tensor:
        cfg = self.config
        denominator = counts.sum()
        if cfg.classifier_loss == "ce":
            terms = F.cross_entropy(logits, labels, reduction="none")
        elif cfg.classifier_loss == "logit_adjusted":
            terms = F.cross_entropy(logits + cfg.logit_adjust_tau * self.log_prior.to(logits.dtype), labels,
                                    reduction="none")
        elif cfg.classifier_loss == "weighted_ce":  # F.cross_entropy's weighted mean: / sum of the weights
            weights = self.class_weights.to(logits.dtype)
            terms = F.cross_entropy(logits, labels, weight=weights, reduction="none")
            denominator = (counts * weights.to(counts.dtype)).sum()
        else:
            terms = self._focal_terms(logits, labels)
        return terms.sum() * (world_size() / denominator).to(terms.dtype)

    def distribute(self, scope: str | None, group=None) -> None:
        """Train as one rank of a ``torch.distributed`` run: ``scope`` "global"
        or "local" (None: not, the default) is where the SCLA loss takes its
        batch statistics (with "global", :func:`cascla_ext.distributed.scla_loss_global`
        over all ranks' anchors). The training loop then passes forward the
        global class counts of the labelled utterances (``label_counts``):
        the CE terms are normalised by the global count, and the conditions
        (fewer than 2 labelled utterances for the contrastive term) are on
        the global batch with the global scope, so every rank joins the same
        collectives, also with no labelled utterance of its own. ``group``:
        the process group of the SCLA loss's collectives (None: the default
        group; with NCCL, give it its own, so that its all-reduce in the
        backward cannot interleave with DDP's). docs/distributed.md."""
        if scope not in (None, *SCOPES):
            raise ValueError(f"CaSCLA.distribute: expected scope None, 'local' or 'global', got {scope!r}")
        if scope == "global" and self.config.use_scla and self.config.contrastive != "scla":
            raise ValueError(f"--scla-scope global: the {self.config.contrastive} loss has no global form; "
                             "use --contrastive scla or --scla-scope local")
        self.distributed_scope = scope
        if isinstance(getattr(self, "scla", None), SCLALoss):
            self.scla.scope, self.scla.group = scope or "local", group

    # ---------------------------------------------------------------- forward
    def forward(self, batch: Batch, *, grad_norms: bool = False, label_counts: Tensor | None = None
                ) -> CaSCLAOutput:
        """``label_counts`` (K,): in a distributed training run (see
        :meth:`distribute`), the labelled utterances per class over all
        ranks' batches (:func:`cascla_ext.distributed.global_label_counts`).
        Dropout draws the masks of the global batch that ``batch.global_layout``
        places the batch in (:mod:`cascla_ext.nn.dropout`)."""
        with global_batch(batch.global_layout):
            return self._forward(batch, grad_norms, label_counts)

    def _forward(self, batch: Batch, grad_norms: bool, label_counts: Tensor | None) -> CaSCLAOutput:
        self._check_batch(batch)
        cfg = self.config
        mask = batch.mask
        cs = {m: self.encoders[m](batch.features[m], mask) for m in cfg.modalities}
        x, xs = self.fusion(cs, mask)
        x = x * self.fusion_gain
        labels = batch.labels
        training_losses = labels is not None and self.training
        use_ast = cfg.use_ast and training_losses and torch.is_grad_enabled()

        rho = None
        if use_ast:
            B, T = mask.shape
            rho = [x.new_zeros(B, T, 3 * cfg.d_hidden, requires_grad=True) for _ in range(2)]
        prepared = self._prepare_interaction(batch)
        f = self._context_to_features(x, batch, rho, prepared)
        logits = self.classifier(f)
        out = CaSCLAOutput(logits=logits, features=f)
        if labels is None:
            return out

        index = batch.valid_index
        if index is not None and index.device == mask.device:
            # The labelled utterances by index (Batch.to): M known on the host,
            # no host sync on a GPU; the same rows in the same order as valid.
            n_local = n_valid = index.numel()

            def pick(t: Tensor) -> Tensor:
                return t.flatten(0, 1).index_select(0, index)
        else:
            valid = mask & (labels >= 0)
            n_local = n_valid = int(valid.sum())  # a host sync on a GPU

            def pick(t: Tensor) -> Tensor:
                return t[valid]
        # Distributed: the global labelled utterances per class (label_counts).
        spread = training_losses and label_counts is not None
        counts = label_counts if spread else None
        if spread:
            n_valid = int(counts.sum())
        if n_valid == 0:
            # Nothing to learn from (e.g. a partly labelled file): no loss term
            # is defined. loss stays None; the training loop counts the step.
            return out
        ce = self.classifier_loss(pick(logits), pick(labels), counts)
        out.losses["ce"] = ce
        views = []
        if use_ast:
            # Eq. 20: the gate perturbation that increases the clean loss most,
            # with L2 norm epsilon where config.ast_norm says (_adversarial_perturbation).
            grads = torch.autograd.grad(ce, rho, retain_graph=True)
            rho_adv = self._adversarial_perturbation(x.detach(), grads, mask, spread)
            out.perturbation = rho_adv
            f_adv = self._context_to_features(x, batch, rho_adv, prepared)
            out.losses["ce_adv"] = self._ce(f_adv, labels, pick, counts)
            if cfg.ast_view:
                views.append(f_adv)
        # The SCLA loss contrasts samples with each other: it needs M >= 2
        # (MELD has one-utterance dialogues, so a batch of one has M = 1). With
        # fewer the batch trains on the cross-entropy terms alone, and
        # out.losses has no contrastive entry, which the training loop counts.
        # (Distributed: on the global count with the global scope, where every
        # rank joins the loss's all-reduce; per rank with the local one.)
        if cfg.use_scla and (n_valid if self.distributed_scope == "global" else n_local) >= 2:
            if cfg.use_text_augmentation and training_losses:
                x_text = self.fusion.project("t", xs["t"]) * self.fusion_gain
                views.insert(0, self._context_to_features(x_text, batch, None, prepared))
            f_aug = torch.stack([pick(v) for v in views]) if views else None
            out.losses[cfg.contrastive] = self.scla(pick(f), pick(labels), f_aug)
        weights = {"ce": 1.0, cfg.contrastive: cfg.scla_weight, "ce_adv": cfg.ast_weight}
        if cfg.ast_ce == "mean" and "ce_adv" in out.losses:  # the classifier's two terms weigh 1 together
            weights["ce"], weights["ce_adv"] = 1.0 / (1.0 + cfg.ast_weight), cfg.ast_weight / (1.0 + cfg.ast_weight)
        out.loss = sum(weights[k] * v for k, v in out.losses.items())
        if spread and self.distributed_scope == "global" and cfg.use_scla and cfg.contrastive not in out.losses:
            # No contrastive term on any rank (fewer than 2 labelled utterances
            # over all): its parameters join with a zero gradient (DDP runs
            # without find_unused_parameters) and lose it again after the backward.
            out.no_grad = list(self.scla.parameters())
            out.loss = out.loss + sum(p.sum() for p in out.no_grad) * 0
        if grad_norms and x.requires_grad:
            grads = {}
            for k, v in out.losses.items():
                (g,) = torch.autograd.grad(weights[k] * v, x, retain_graph=True, allow_unused=True)
                grads[k] = g
            if not spread:
                out.grad_norms = {k: 0.0 if g is None else float(g.norm()) for k, g in grads.items()}
            else:
                # Each rank's gradient at its x is world_size times its part of
                # the global one: the norm over the global batch, as one process.
                # (Fixed slots: with the local scope a rank may lack the contrastive term.)
                names = ["ce", "ce_adv", cfg.contrastive]
                squares = torch.tensor([[float(grads[k].double().pow(2).sum()) if grads.get(k) is not None
                                         else 0.0, float(k in grads)] for k in names], dtype=torch.float64, device=x.device)
                total = all_reduce_sum(squares)
                out.grad_norms = {k: float(total[i, 0] / world_size() ** 2) ** 0.5
                                  for i, k in enumerate(names) if total[i, 1] > 0}
        return out

    @torch.no_grad()
    def predict(self, batch: Batch) -> Tensor:
        """Class probabilities (B, T, K): softmax(logits + decision_bias); 0 at padded utterances."""
        was_training = self.training
        self.eval()
        try:
            logits = self.forward(Batch(features=batch.features, speakers=batch.speakers, mask=batch.mask,
                                        lengths=batch.lengths, clues=batch.clues, labels=None,
                                        ids=batch.ids)).logits
        finally:
            self.train(was_training)
        return torch.softmax(logits + self.decision_bias, dim=-1) * batch.mask.unsqueeze(-1)

    # ------------------------------------------------------------ checkpoints
    def save(self, path: str | os.PathLike, **extra) -> None:
        """Write config, label names and weights to ``path`` atomically."""
        state = {
            "format": CHECKPOINT_FORMAT,
            "config": self.config.to_dict(),
            "label_names": self.label_names,
            "state_dict": {k: v.detach().cpu() for k, v in self.state_dict().items()},
            **extra,
        }
        atomic_torch_save(state, path)

    @classmethod
    def load(cls, path: str | os.PathLike, map_location: str | torch.device = "cpu") -> CaSCLA:
        """A model from a checkpoint written by :meth:`save` (no training arguments needed)."""
        return cls.load_checkpoint(path, map_location)[0]

    @classmethod
    def load_checkpoint(cls, path: str | os.PathLike,
                        map_location: str | torch.device = "cpu") -> tuple[CaSCLA, dict]:
        """The model and the checkpoint's other entries (the ``**extra`` given
        to :meth:`save`: dataset, data and feature settings, epoch, seed).

        A checkpoint is read as data (``torch.load(weights_only=True)``: no
        code runs), and anything in it that does not fit - a missing or
        invalid config, weights of other shapes or names - raises
        :class:`CheckpointError` naming the file and what does not fit."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"checkpoint {path} does not exist")
        try:
            state = torch.load(path, map_location=map_location, weights_only=True)
        except Exception as err:  # noqa: BLE001 - any unreadable file
            raise CheckpointError(f"checkpoint {path} is not a CaSCLA checkpoint "
                                  f"({_one_line(err)})") from None
        if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
            raise CheckpointError(f"checkpoint {path} is not a CaSCLA checkpoint (format "
                                  f"{state.get('format') if isinstance(state, dict) else '?'})")
        for key, kind in (("config", dict), ("label_names", list), ("state_dict", dict)):
            if not isinstance(state.get(key), kind):
                raise CheckpointError(f"checkpoint {path}: {key!r} is missing or not a {kind.__name__}")
        try:
            config = CaSCLAConfig.from_dict(state["config"])
            model = cls(config, state["label_names"])
        except (TypeError, ValueError, KeyError, AttributeError) as err:
            raise CheckpointError(f"checkpoint {path}: its config does not describe a model "
                                  f"({_one_line(err)})") from None
        weights = dict(state["state_dict"])
        weights.setdefault("decision_bias", torch.zeros(config.num_classes))  # checkpoints before it existed
        try:
            model.load_state_dict(weights)
        except (RuntimeError, TypeError, KeyError, AttributeError) as err:
            raise CheckpointError(f"checkpoint {path}: the weights do not fit its config "
                                  f"({_one_line(err)})") from None
        extra = {k: v for k, v in state.items() if k not in ("format", "config", "label_names", "state_dict")}
        return model, extra


def _one_line(err: BaseException, limit: int = 300) -> str:
    text = " ".join(str(err).split()) or type(err).__name__
    return text if len(text) <= limit else text[:limit - 3] + "..."
