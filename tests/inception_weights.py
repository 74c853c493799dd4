"""`write_random_inception_weights`: a random-init Inception file in the format torch-fidelity loads, so the FID
tests run without the real weights (their figures are then only self-consistent, not comparable with published FIDs)."""

from __future__ import annotations

from pathlib import Path
from unittest import mock

import torch


def write_random_inception_weights(path: str | Path, seed: int = 0) -> Path:
    """A random-init `inception-v3-compat` state dict at `path`, in the format torch-fidelity loads."""
    from torch_fidelity import feature_extractor_inceptionv3 as fe

    torch.manual_seed(seed)
    # the constructor always loads weights (from the URL when no path is given): skip that step only
    with mock.patch.object(fe, "load_state_dict_from_url", lambda *a, **k: None), \
            mock.patch.object(fe.FeatureExtractorInceptionV3, "load_state_dict", lambda self, sd, *a, **k: None):
        net = fe.FeatureExtractorInceptionV3("inception-v3-compat", ["2048"])
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(net.state_dict(), path)
    return path
