"""Domain Separation Networks (Bousmalis et al., NeurIPS 2016): ``adapt=dsn``.

Each domain's backbone features ``f`` are split into a **shared** code, the same encoder for both
domains, and a **private** code, one encoder per domain. The classifier reads the shared code
only, so what it learns from the source applies wherever the shared code means the same thing:

* shared encoder ``E_c``: the head's bottleneck (Linear -> BatchNorm -> ReLU, as DANN's), so the
  saved checkpoint is an ordinary ``head=bottleneck`` classification checkpoint;
* private encoders ``E_p^s``, ``E_p^t``: the same layout, one per domain;
* shared decoder ``D``: a linear map of ``E_c(f) + E_p(f)`` (the paper adds the two codes) back
  to ``f``;
* classifier ``G``: the head's last linear layer, on ``E_c(f)``.

Loss (the paper's eq. 1): ``CE(G(E_c(f_s)), y_s) + recon_weight * L_recon + diff_weight * L_diff
+ sim_weight * L_sim``:

* ``L_recon``: the scale-invariant MSE (Eigen et al., 2014; the paper's eq. 3) between ``f`` and
  ``D(E_c(f) + E_p(f))``, per input ``(1/k)||d||^2 - (1/k^2)(d . 1)^2`` with ``d = f - f_hat``,
  divided by the same quantity for ``f_hat = 0`` (the spread of ``f`` across its dimensions), so
  that 1 means "no better than a constant" on any backbone, whatever the scale of its features;
  both domains, mean over inputs.
* ``L_diff``: the soft orthogonality ``||S^T P||_F^2`` (eq. 4) between the shared codes ``S`` and
  the private codes ``P`` of a batch (rows are inputs), computed, as in the authors' code, on
  codes centred over the batch and scaled to unit norm (here per column, so an entry of ``S^T P``
  is the correlation of a shared and a private unit and orthogonal codes still give 0), and
  averaged over the ``d_s x d_p`` entries: 0 for orthogonal codes, 1 for identical ones; per
  domain, summed.
* ``L_sim`` on the shared codes of source and target: ``dann`` (the paper's DANN variant, its
  better one: a domain discriminator behind gradient reversal, Ganin et al.'s coefficient ramp) or
  ``mmd`` (its MMD variant: a multi-kernel Gaussian MMD^2, bandwidths around the batch's median
  distance, weighted by the same ramp).

The backbone's features are the reconstruction target, not the raw input: text tokens and audio
samples have no decoder to speak of, and the features are what the head sees. With a backbone
that trains (``strategy=finetune``) the target is detached and the private encoders read detached
features, so the backbone is shaped only through the shared code and cannot make reconstruction
trivial by shrinking its features.

The private encoders, the decoder and the discriminator are not submodules of the task: they
train in its optimizer (extra param groups) and are not saved. ``tl eval``, ``tl predict`` and
``tl export`` load the checkpoint unchanged.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from tl_cli.core.console import warn
from tl_cli.transfer.adapt import (
    ADAPTERS,
    DANN,
    classify,
    dann_coefficient,
    embed,
    grad_reverse,
    progress,
)

SIMILARITY = ("dann", "mmd")


# --------------------------------------------------------------------------- the losses


def scale_invariant_mse(x: torch.Tensor, x_hat: torch.Tensor) -> torch.Tensor:
    """Eigen et al.'s scale-invariant MSE per row, ``(1/k)||d||^2 - (1/k^2)(d . 1)^2``, ``d = x -
    x_hat``: blind to a constant offset of a row (DSN's reconstruction loss, eq. 3)."""
    d = x - x_hat
    k = d.shape[-1]
    return d.square().sum(-1) / k - d.sum(-1).square() / (k * k)


def reconstruction_loss(x: torch.Tensor, x_hat: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """The scale-invariant MSE relative to that of a constant reconstruction (the row's spread):
    0 for an exact one, about 1 for no information; the batch mean."""
    err = scale_invariant_mse(x, x_hat)
    spread = scale_invariant_mse(x, torch.zeros_like(x)).detach()
    return (err / (spread + eps)).mean()


def difference_loss(shared: torch.Tensor, private: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """DSN's soft orthogonality ``||S^T P||_F^2`` (eq. 4) on batch-centred, unit-norm columns,
    averaged over its entries: the mean squared correlation between shared and private units."""
    s = shared - shared.mean(0, keepdim=True)
    p = private - private.mean(0, keepdim=True)
    s = F.normalize(s, dim=0, eps=eps)
    p = F.normalize(p, dim=0, eps=eps)
    return (s.T @ p).square().mean()


def mmd_loss(a: torch.Tensor, b: torch.Tensor, scales: tuple[float, ...] = (0.25, 0.5, 1, 2, 4)):
    """Squared maximum mean discrepancy (biased estimate) between two batches, with a sum of
    Gaussian kernels whose bandwidths are ``scales`` x the median pairwise squared distance (the
    multi-kernel MMD of DSN's MMD variant and of Long et al.'s DAN)."""
    x = torch.cat([a, b])
    d2 = torch.cdist(x, x).square()
    med = d2.detach()[d2.detach() > 0].median() if bool((d2 > 0).any()) else d2.new_tensor(1.0)
    k = sum(torch.exp(-d2 / (s * med)) for s in scales)
    n = a.shape[0]
    return k[:n, :n].mean() + k[n:, n:].mean() - 2 * k[:n, n:].mean()


# --------------------------------------------------------------------------- the adapter


class PrivateEncoder(nn.Sequential):
    """A domain's private encoder: the shared bottleneck's layout (Linear -> BatchNorm -> ReLU)."""

    def __init__(self, in_features: int, dim: int) -> None:
        super().__init__(nn.Linear(in_features, dim), nn.BatchNorm1d(dim), nn.ReLU())


def _encode(encoder: nn.Module, f: torch.Tensor) -> torch.Tensor:
    """``encoder(f)``; a batch of one (the last of an epoch) uses the BatchNorm's running
    statistics, which a training-mode BatchNorm cannot do without."""
    if f.shape[0] > 1 or not encoder.training:
        return encoder(f)
    encoder.eval()
    try:
        return encoder(f)
    finally:
        encoder.train()


@ADAPTERS.register("dsn")
class DSN(DANN):
    """Domain Separation Networks (Bousmalis et al., NeurIPS 2016); module docstring for the model.

    Args:
        bottleneck: width of the shared and private codes (the head's bottleneck).
        hidden: width of the discriminator's two hidden layers (``similarity=dann``).
        similarity: ``dann`` (domain-adversarial) or ``mmd`` on the shared codes.
        sim_weight: weight of the similarity loss (DANN's ``trade_off``).
        recon_weight: weight of the reconstruction loss.
        diff_weight: weight of the difference (orthogonality) loss.
        gamma: steepness of the ramp ``2 / (1 + exp(-gamma p))`` - 1 that weights the similarity
            loss over training progress ``p``.
    """

    def __init__(
        self,
        bottleneck: int = 256,
        hidden: int = 1024,
        similarity: str = "dann",
        sim_weight: float = 1.0,
        recon_weight: float = 1.0,
        diff_weight: float = 1.0,
        gamma: float = 10.0,
    ) -> None:
        super().__init__(bottleneck=bottleneck, hidden=hidden, trade_off=sim_weight, gamma=gamma)
        if similarity not in SIMILARITY:
            raise ValueError(f"similarity={similarity!r} must be one of {', '.join(SIMILARITY)}")
        if float(recon_weight) < 0 or float(diff_weight) < 0:
            raise ValueError("recon_weight and diff_weight must be >= 0")
        self.similarity = similarity
        self.recon_weight, self.diff_weight = float(recon_weight), float(diff_weight)
        self.private: nn.ModuleDict | None = None
        self.decoder: nn.Linear | None = None
        #: the encoders as initialised (disentangle.png's "before" panels)
        self.initial: dict[str, nn.Module] = {}

    def bind(self, module: Any) -> None:
        super().bind(module)  # the bottleneck head, the discriminator (used when similarity=dann)
        if self.similarity != "dann":
            self.discriminator = None
        dim = module.head[-1].in_features
        nf = module.backbone.num_features
        self.private = nn.ModuleDict(
            {"source": PrivateEncoder(nf, dim), "target": PrivateEncoder(nf, dim)}
        )
        self.decoder = nn.Linear(dim, nf)

    def trainable(self) -> list[nn.Module]:
        """What trains beside the task and is never saved."""
        mods: list[nn.Module] = [self.private, self.decoder]
        return mods + ([self.discriminator] if self.discriminator is not None else [])

    def param_groups(self, base_lr: float, weight_decay: float) -> list[dict[str, Any]]:
        return [
            {
                "params": [p for m in self.trainable() for p in m.parameters()],
                "lr": base_lr,
                "weight_decay": weight_decay,
                "name": "dsn_private_decoder_discriminator",
                "unfreeze_epoch": 0,
                "lr_mult": 1.0,
            }
        ]

    def on_fit_start(self, module: Any) -> None:
        for m in self.trainable():
            m.to(module.device).train()
        if not self.initial:
            self.initial = {
                "shared": copy.deepcopy(module.head).cpu().eval(),
                "private": copy.deepcopy(self.private).cpu().eval(),
            }

    def losses(
        self, module: Any, fs: torch.Tensor, ft: torch.Tensor
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """(the shared codes of source + target, the DSN losses but the task's) for one batch."""
        ns = fs.shape[0]
        z = embed(module.head, torch.cat([fs, ft]))  # one batch: the shared BatchNorm sees both
        zs, zt = z[:ns], z[ns:]
        assert self.private is not None and self.decoder is not None
        ps = _encode(self.private["source"], fs.detach())
        pt = _encode(self.private["target"], ft.detach())
        recon = 0.5 * (
            reconstruction_loss(fs.detach(), self.decoder(zs + ps))
            + reconstruction_loss(ft.detach(), self.decoder(zt + pt))
        )
        diff = difference_loss(zs, ps) + difference_loss(zt, pt)
        coeff = dann_coefficient(progress(module), self.gamma)
        out: dict[str, torch.Tensor] = {"recon_loss": recon, "diff_loss": diff}
        if self.similarity == "dann":
            assert self.discriminator is not None
            self.discriminator.train()
            d = self.discriminator(grad_reverse(z, coeff)).squeeze(1)
            dy = torch.cat(
                [torch.ones(ns, device=d.device), torch.zeros(len(d) - ns, device=d.device)]
            )
            out["domain_loss"] = F.binary_cross_entropy_with_logits(d, dy)
            out["domain_acc"] = ((d > 0).float() == dy).float().mean()
            sim = out["domain_loss"]  # the reversal layer carries the ramp
        else:
            out["mmd"] = mmd_loss(zs, zt)
            sim = coeff * out["mmd"]
        total = self.trade_off * sim + self.recon_weight * recon + self.diff_weight * diff
        return z, {**out, "total": total, "coeff": torch.tensor(coeff)}

    def training_step(self, module: Any, batch: Any) -> torch.Tensor:
        (xs, ys), xt = batch["source"], batch["target"]
        fs, ft = module.features(xs), module.features(xt)
        ns = fs.shape[0]
        z, parts = self.losses(module, fs, ft)
        out = classify(module.head, z[:ns])
        cls = module.loss(out, ys, "train")
        log = {"on_step": False, "on_epoch": True, "batch_size": ns}
        module.log("train/loss", cls, prog_bar=True, **log)
        for k, v in parts.items():
            if k not in ("total", "coeff"):
                module.log(f"train/{k}", v, **log)
        module.log("train/grl_coeff", float(parts["coeff"]), **log)
        module.update_metrics(out, ys, "train")
        return cls + parts["total"]

    def describe(self) -> str:
        return (
            f"DSN (shared + private codes of {self.bottleneck}, {self.similarity} similarity x"
            f"{self.trade_off:g}, reconstruction x{self.recon_weight:g}, difference "
            f"x{self.diff_weight:g})"
        )

    # -- the plot
    @torch.no_grad()
    def codes(
        self, module: Any, feats: np.ndarray, domain: str, initial: bool = False
    ) -> tuple[np.ndarray, np.ndarray]:
        """(shared, private) codes of ``feats`` (eval mode), by the trained or initial encoders."""
        head = self.initial["shared"] if initial else module.head
        private = (self.initial["private"] if initial else self.private)[domain]
        dev = next(head.parameters()).device
        was = head.training, private.training
        head.eval()
        private.eval()
        private.to(dev)
        try:
            x = torch.as_tensor(np.asarray(feats, dtype=np.float32), device=dev)
            return embed(head, x).float().cpu().numpy(), private(x).float().cpu().numpy()
        finally:
            head.train(was[0])
            private.train(was[1])

    def plots(
        self,
        module: Any,
        out: Path,
        src: np.ndarray,
        tgt: np.ndarray,
        src_labels: np.ndarray,
        tgt_labels: np.ndarray,
    ) -> None:
        """``disentangle.png``: source and target in the shared and private spaces, by the
        encoders as initialised (before) and as trained (after)."""
        from tl_cli.transfer.domains import plot_disentangle

        if not self.initial:
            warn("disentangle.png not written: no initial encoders (a resumed run)")
            return
        panels = {}
        for when, initial in (("before", True), ("after", False)):
            (s_src, p_src), (s_tgt, p_tgt) = (
                self.codes(module, src, "source", initial),
                self.codes(module, tgt, "target", initial),
            )
            panels[("shared", when)] = (s_src, s_tgt)
            panels[("private", when)] = (p_src, p_tgt)
        plot_disentangle(out / "disentangle.png", panels, src_labels, tgt_labels)
