"""Scores of a latent space against known labels, as plain functions on arrays."""

from __future__ import annotations

import numpy as np
from sklearn.cluster import KMeans
from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score, silhouette_score

__all__ = ["kmeans_scores", "silhouette"]


def kmeans_scores(
    latent: np.ndarray, labels, *, n_clusters: int | None = None, seed: int = 0
) -> dict[str, float]:
    """KMeans on ``latent`` (as many clusters as labels unless given); ARI and NMI against
    ``labels``."""
    labels = np.asarray(labels)
    k = n_clusters or len(np.unique(labels))
    found = KMeans(n_clusters=k, n_init=10, random_state=seed).fit_predict(latent)
    return {
        "ari": float(adjusted_rand_score(labels, found)),
        "nmi": float(normalized_mutual_info_score(labels, found)),
    }


def silhouette(latent: np.ndarray, labels) -> float:
    """Average silhouette width of the cells by label, in [-1, 1] (Rousseeuw 1987)."""
    return float(silhouette_score(latent, np.asarray(labels)))
