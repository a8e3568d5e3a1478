"""Per-pixel colour and texture evidence for the detector's map: one Gaussian per class, fitted in closed form.

The CLIP scores one token per 8x8 patch: it knows what a neighbourhood is, not which of its pixels
is the 3-px road. The shots' labelled pixels already say what each class looks like pixel by pixel,
so each class gets a Gaussian over a pixel's features (its RGB, and each band's mean and standard
deviation in w x w windows around it); the map adds a weight times each class's log-likelihood to
the CLIP's logits (a product of experts: the CLIP brings context, the pixels their own colour).
Fitting is one mean and covariance per class, no training loop; nothing here depends on the CLIP.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

NODATA = 255  # mask value of unlabelled pixels


def pixel_features(images: torch.Tensor, windows: Sequence[int]) -> torch.Tensor:
    """(B, F, H, W) features of RGB 0..255 tiles: RGB, then per window side the local mean and std of each band.

    Windows shrink at the image border to the pixels inside it.
    """
    x = images.float()
    columns = [x]
    for w in windows:
        mean = F.avg_pool2d(x, w, stride=1, padding=w // 2, count_include_pad=False)
        var = F.avg_pool2d(x * x, w, stride=1, padding=w // 2, count_include_pad=False) - mean * mean
        columns += [mean, var.clamp_min(0).sqrt()]
    return torch.cat(columns, dim=1)


class PixelGaussians(nn.Module):
    """Class-conditional Gaussians over pixel features: RGB 0..255 (B, 3, H, W) -> log-likelihoods (B, K, H, W).

    Classes without a labelled pixel in the fit (the novel classes of base-to-novel tuning) get, at
    each pixel, the largest of the known classes' log-likelihoods: the pixels never rule them out,
    and between such a class and the best-fitting known one the CLIP's text decides (with the mean
    instead, novel classes lost to the base ones nearly everywhere: novel mIoU 0.05 against 0.24).
    """

    center: torch.Tensor  # buffers, registered in __init__
    scale: torch.Tensor
    means: torch.Tensor
    precisions: torch.Tensor
    log_dets: torch.Tensor
    known: torch.Tensor

    def __init__(self, windows: Sequence[int], n_classes: int) -> None:
        super().__init__()
        self.windows = tuple(int(w) for w in windows)
        if any(w < 1 or w % 2 == 0 for w in self.windows):
            raise ValueError(f"pixel evidence windows must be odd sides >= 1, got {list(self.windows)}")
        n = 3 * (1 + 2 * len(self.windows))
        self.register_buffer("center", torch.zeros(n))
        self.register_buffer("scale", torch.ones(n))
        self.register_buffer("means", torch.zeros(n_classes, n))
        self.register_buffer("precisions", torch.eye(n).repeat(n_classes, 1, 1))
        self.register_buffer("log_dets", torch.zeros(n_classes))
        self.register_buffer("known", torch.zeros(n_classes, dtype=torch.bool))

    @torch.no_grad()
    def fit(self, images: torch.Tensor, masks: torch.Tensor, ridge: float = 0.01) -> PixelGaussians:
        """Fit on uint8 tiles (N, 3, H, W) and masks (N, H, W) whose 255 pixels are ignored; returns self.

        Features are standardised over the labelled pixels; ``ridge`` is added to each class's
        covariance (in standard units) so that a class with few or flat pixels stays invertible.
        """
        feats = pixel_features(images, self.windows).permute(0, 2, 3, 1).reshape(-1, len(self.center))
        labels = masks.reshape(-1).long()
        labelled = labels != NODATA
        feats, labels = feats[labelled], labels[labelled]
        if len(labels) == 0:
            raise ValueError("the shots hold no labelled pixel (all 255): there is nothing to fit pixel evidence on")
        self.center.copy_(feats.mean(0))
        self.scale.copy_(feats.std(0).clamp_min(1e-3))
        z = (feats - self.center) / self.scale
        eye = torch.eye(z.shape[1])
        for c in range(len(self.means)):
            zc = z[labels == c]
            if len(zc) < 2:
                continue  # unknown: see the class docstring
            cov = torch.cov(zc.T) + ridge * eye
            self.means[c], self.precisions[c] = zc.mean(0), torch.linalg.inv(cov)
            self.log_dets[c] = torch.logdet(cov)
            self.known[c] = True
        return self

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        b, _, h, w = images.shape
        z = (pixel_features(images, self.windows).permute(0, 2, 3, 1) - self.center) / self.scale
        z = z.reshape(-1, z.shape[-1])  # (B*H*W, F)
        loglik = torch.empty(z.shape[0], len(self.means), dtype=z.dtype, device=z.device)
        for c in range(len(self.means)):  # one class at a time: memory stays that of the features
            diff = z - self.means[c]
            loglik[:, c] = -0.5 * (((diff @ self.precisions[c]) * diff).sum(dim=1) + self.log_dets[c])
        if not bool(self.known.all()):
            neutral = loglik[:, self.known].max(dim=1, keepdim=True).values
            loglik = torch.where(self.known, loglik, neutral)
        return loglik.reshape(b, h, w, -1).permute(0, 3, 1, 2)  # (B, K, H, W)
