"""A plain PyTorch VAE with pyrovae's default network, loss and training rule; no Pyro.

The yardstick of ``benchmarks/speed.py``: what pyrovae's default ZINB model costs when
written by hand. Everything that decides the amount of arithmetic is pyrovae's:

- encoder ``log1p(x) -> Linear(G, 128) -> BatchNorm1d(momentum=0.01, eps=1e-3) -> ReLU ->
  Dropout(0.1)``, heads ``loc = Linear(128, 10)`` and ``scale = softplus(Linear(128, 10)) +
  1e-4``; ``z = loc + scale * eps`` (one reparameterised draw);
- decoder ``z -> Linear(10, 128) -> BatchNorm1d -> ReLU`` and one ``Linear(128, G)`` per
  head: ``rho = softmax(.)`` over genes and ``gate_logits``; ``log_theta`` per gene,
  initialised at 0; mean ``mu = l * rho`` with ``l`` the cell's observed total count;
- ``p(x | z, l) = ZINB(mu, theta, sigmoid(gate_logits))`` (:func:`zinb_log_prob`, scVI's
  formula) and the closed-form ``KL(q(z | x) || N(0, I))``;
- the loss of a minibatch of ``B`` out of ``N`` cells is ``-(N / B) * sum over the batch of
  (log p(x | z, l) - kl_weight * KL)``, which is what pyrovae's
  ``TraceMeanField_ELBO()(model, guide)`` computes with ``pyro.plate(size=N, subsample=...)``
  (the scale matters: Adam's ``eps`` and ``weight_decay`` are not scale-invariant);
- ``Adam(lr=1e-3, weight_decay=1e-6, eps=0.01)``, random near-equal minibatches of about
  128 cells, KL weight ``min(1, (epoch + 1) / 50)``.

The layers are created in the order pyrovae's ``VAEModule`` creates them, so with the same
``torch.manual_seed`` both start from the same weights.
"""

from __future__ import annotations

import math
import time

import numpy as np
import pandas as pd
import scipy.sparse as sp
import torch
from torch import nn
from torch.nn import functional as F

__all__ = [
    "ReferenceVAE",
    "evaluate_elbo",
    "kl_standard_normal",
    "minibatches",
    "train_reference",
    "zinb_log_prob",
]


def zinb_log_prob(
    x: torch.Tensor, log_mu: torch.Tensor, log_theta: torch.Tensor, gate_logits: torch.Tensor
) -> torch.Tensor:
    """Element-wise ``log ZINB(x; mu, theta, pi)``, ``pi = sigmoid(gate_logits)``.

    scVI's ``log_zinb_positive``, written on ``log mu`` and ``log theta`` so that no ``eps``
    is needed and the two log ratios keep float32 precision at large counts::

        log NB(x) = lgamma(x + theta) - lgamma(theta) - lgamma(x + 1)
                    + theta log(theta / (theta + mu)) + x log(mu / (theta + mu))
        log(theta / (theta + mu)) = -softplus(d),  log(mu / (theta + mu)) = d - softplus(d),
        d = log mu - log theta
        log ZINB(0) = softplus(log NB(0) - g) - softplus(-g)
        log ZINB(x > 0) = log NB(x) - g - softplus(-g)

    ``log_theta`` may be per gene (it broadcasts; ``lgamma(theta)`` is then computed once
    per gene, not once per cell and gene).
    """
    theta = log_theta.exp()
    d = log_mu - log_theta
    softplus_d = F.softplus(d)
    log_nb_zero = -theta * softplus_d
    softplus_neg_gate = F.softplus(-gate_logits)
    zero = F.softplus(log_nb_zero - gate_logits) - softplus_neg_gate
    nonzero = (
        log_nb_zero
        + x * (d - softplus_d)
        + torch.lgamma(x + theta)
        - torch.lgamma(theta)
        - torch.lgamma(x + 1)
        - gate_logits
        - softplus_neg_gate
    )
    return torch.where(x == 0, zero, nonzero)


def kl_standard_normal(loc: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``KL(N(loc, diag(scale^2)) || N(0, I))`` per cell (summed over the last dimension)."""
    return (0.5 * (loc.square() + scale.square() - 1.0) - scale.log()).sum(-1)


class ReferenceVAE(nn.Module):
    """pyrovae's default ZINB VAE (one hidden layer of 128, latent 10) in plain PyTorch."""

    def __init__(self, n_genes: int, n_latent: int = 10, n_hidden: int = 128, dropout: float = 0.1):
        super().__init__()
        # creation order = pyrovae's VAEModule: guide (encoder), then model (decoder, gene
        # parameters), so that one seed gives both the same initial weights
        self.encoder_body = nn.Sequential(
            nn.Linear(n_genes, n_hidden), nn.BatchNorm1d(n_hidden, momentum=0.01, eps=1e-3),
            nn.ReLU(), nn.Dropout(dropout),
        )
        self.loc = nn.Linear(n_hidden, n_latent)
        self.scale = nn.Linear(n_hidden, n_latent)
        self.decoder_body = nn.Sequential(
            nn.Linear(n_latent, n_hidden), nn.BatchNorm1d(n_hidden, momentum=0.01, eps=1e-3),
            nn.ReLU(),
        )
        self.rho = nn.Linear(n_hidden, n_genes)
        self.gate_logits = nn.Linear(n_hidden, n_genes)
        self.log_theta = nn.Parameter(torch.zeros(n_genes))

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(loc, scale)`` of ``q(z | x)``."""
        h = self.encoder_body(torch.log1p(x))
        return self.loc(h), F.softplus(self.scale(h)) + 1e-4

    def decode(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(log rho, gate_logits)``, each ``(cells, genes)``."""
        h = self.decoder_body(z)
        return torch.log_softmax(self.rho(h), -1), self.gate_logits(h)

    def elbo_terms(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(log p(x | z, l), KL)`` per cell, with one draw ``z ~ q(z | x)``."""
        loc, scale = self.encode(x)
        # torch.distributions' rsample: the same random stream as pyrovae's guide draw
        z = torch.distributions.Normal(loc, scale).rsample()
        log_rho, gate_logits = self.decode(z)
        log_mu = torch.log(x.sum(-1, keepdim=True)) + log_rho
        log_lik = zinb_log_prob(x, log_mu, self.log_theta, gate_logits).sum(-1)
        return log_lik, kl_standard_normal(loc, scale)

    def forward(self, x: torch.Tensor, n_obs: int, kl_weight: float = 1.0) -> torch.Tensor:
        """The training loss of a minibatch: ``-(N / B) * sum(log p - kl_weight * KL)``."""
        log_lik, kl = self.elbo_terms(x)
        return -(n_obs / len(x)) * (log_lik - kl_weight * kl).sum()


def minibatches(index: np.ndarray, batch_size: int, rng: np.random.Generator | None):
    """pyrovae's rule: a random permutation cut into near-equal sorted chunks."""
    if rng is not None:
        index = rng.permutation(index)
    for chunk in np.array_split(index, max(1, math.ceil(len(index) / batch_size))):
        yield np.sort(chunk)


def _rows(X, index: np.ndarray) -> torch.Tensor:
    block = X[index]
    return torch.from_numpy(block.toarray() if sp.issparse(block) else np.asarray(block, np.float32))


def train_reference(
    model: ReferenceVAE,
    X,
    *,
    max_epochs: int,
    batch_size: int = 128,
    lr: float = 1e-3,
    weight_decay: float = 1e-6,
    kl_warmup_epochs: int = 50,
    seed: int = 0,
    on_epoch_start=None,
) -> pd.DataFrame:
    """Train on all rows of ``X`` (CSR or dense float32 counts), no validation, no early stopping.

    Returns the history per epoch (``epoch``, ``kl_weight``, ``train_elbo``, ``seconds``);
    ``seconds`` times what pyrovae's ``history["seconds"]`` times: the minibatch loop
    (cutting and densifying the batches, forward, backward, optimiser step) and the
    epoch's bookkeeping. ``on_epoch_start()``, when given, is called as each epoch starts
    (for an outside clock).
    """
    n_obs = X.shape[0]
    rng = np.random.default_rng(seed)
    rng.permutation(n_obs)  # pyrovae draws its validation split first; keep the same stream
    train_idx = np.arange(n_obs)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=weight_decay, eps=0.01,
                                 fused=True)  # as pyrovae.train.adam
    rows = []
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for epoch in range(max_epochs):
            if on_epoch_start is not None:
                on_epoch_start()
            start = time.perf_counter()
            kl_weight = min(1.0, (epoch + 1) / kl_warmup_epochs) if kl_warmup_epochs else 1.0
            model.train()
            total = torch.zeros(())
            for chunk in minibatches(train_idx, batch_size, rng):
                x = _rows(X, chunk)
                loss = model(x, n_obs, kl_weight)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                total += loss.detach() * len(chunk)
            train_elbo = -float(total) / n_obs / n_obs
            rows.append((epoch + 1, kl_weight, train_elbo, time.perf_counter() - start))
    model.eval()
    return pd.DataFrame(rows, columns=["epoch", "kl_weight", "train_elbo", "seconds"])


def evaluate_elbo(
    model: ReferenceVAE, X, *, n_samples: int = 10, batch_size: int = 1024, seed: int = 0
) -> np.ndarray:
    """The ELBO of each row of ``X`` in nats, as pyrovae's ``VAE.elbo`` computes it:
    evaluation mode, ``log p(x | z, l)`` averaged over ``n_samples`` draws of ``z``, minus
    the closed-form KL."""
    model.eval()
    out = []
    with torch.random.fork_rng(devices=[]), torch.no_grad():
        torch.manual_seed(seed)
        for start in range(0, X.shape[0], batch_size):
            x = _rows(X, np.arange(start, min(start + batch_size, X.shape[0])))
            log_lik = torch.zeros(len(x))
            for _ in range(n_samples):
                draw, kl = model.elbo_terms(x)
                log_lik += draw
            out.append(log_lik / n_samples - kl)
    return torch.cat(out).numpy()
