"""pyrospatial runner of the domains benchmark: ``pyrospatial.domains`` with its defaults and the
number of domains given; ``--variant all`` uses every modality present (counts, and the
``obsm['morphology']`` image features on Visium), ``--variant counts`` counts only. Several
``--input`` files are fitted jointly (one model, shared domains). Writes the labels and
``obs['domain_confidence']`` per input.
"""

from __future__ import annotations

import numpy as np
from domains_common import run


def method(adatas, n_domains: int, seed: int, variant: str) -> dict:
    try:
        from pyrospatial import domains
    except ImportError:  # before the top-level export exists
        from pyrospatial.methods.domains import domains

    if variant == "counts":
        modalities = ("counts",)
    elif variant == "all":
        modalities = None
    else:
        raise SystemExit(f"unknown --variant {variant!r}: all or counts")
    out = domains(adatas if len(adatas) > 1 else adatas[0], n_domains=n_domains, modalities=modalities,
                     seed=seed, progress=False)
    outs = out if isinstance(out, list) else [out]
    info = outs[0].uns.get("domains", {})
    return {"labels": [np.asarray(o.obs["domain"].astype(str)) for o in outs],
            "confidence": [np.asarray(o.obs["domain_confidence"], dtype=float).tolist() for o in outs],
            "modalities": [str(m) for m in np.atleast_1d(info.get("modalities", []))]}


if __name__ == "__main__":
    run(method)
