"""Annotator backends and the factory that builds them from an :class:`AnnotatorSpec`.

Heavy imports (transformers, torch models) happen only when a backend is built.
"""

from __future__ import annotations

from typing import Any

from umgclip.annotate.config import AnnotatorSpec

#: backend -> slots it can fill.
SLOTS: dict[str, tuple[str, ...]] = {
    "classical": ("detector", "masker"),
    "imagenet": ("tagger", "region_labeller"),
    "umgclip": ("tagger", "region_labeller", "scorer"),
    "owlv2": ("detector",),
    "sam": ("masker",),
    "blip": ("captioner", "region_captioner"),
    "clip": ("tagger", "region_labeller", "scorer"),
}


def build_annotator(slot: str, spec: AnnotatorSpec, vocabulary: list[str] | None = None) -> Any:
    """The annotator for ``slot`` described by ``spec`` (``None`` when the slot is off)."""
    b = spec.backend
    if b == "none":
        return None
    if b not in SLOTS:
        raise ValueError(f"{slot}: unknown backend {b!r}; known: none, {', '.join(SLOTS)}")
    if slot not in SLOTS[b]:
        raise ValueError(f"backend {b!r} cannot fill the {slot} slot (it fills {SLOTS[b]})")
    opts = dict(spec.options)
    if b == "classical":
        from umgclip.annotate.backends.classical import SelectiveSearchProposer, SuperpixelMasker

        return SelectiveSearchProposer(**opts) if slot == "detector" else SuperpixelMasker(**opts)
    if b == "imagenet":
        from umgclip.annotate.backends.imagenet_tagger import (
            ImageNetRegionLabeller,
            ImageNetTagger,
        )

        cls = ImageNetRegionLabeller if slot == "region_labeller" else ImageNetTagger
        return cls(device=spec.device, **opts)
    if b == "umgclip":
        from umgclip.annotate.backends.umgclip_backend import UMGCLIPBackend

        return UMGCLIPBackend(
            model=spec.model or "umg-lite",
            pretrained=spec.pretrained,
            device=spec.device,
            vocabulary=vocabulary,
            **opts,
        )
    if not spec.model:
        raise ValueError(f"{slot}: backend {b!r} needs `model` (a local folder or model id)")
    from umgclip.annotate.backends import transformers_hf as hf

    if b == "owlv2":
        return hf.HFOwlDetector(spec.model, device=spec.device, **opts)
    if b == "sam":
        return hf.HFSamMasker(spec.model, device=spec.device, **opts)
    if b == "blip":
        return hf.HFBlipCaptioner(spec.model, device=spec.device, **opts)
    return hf.HFClipScorer(spec.model, device=spec.device, vocabulary=vocabulary, **opts)
