"""Generate the shipped annotation vocabularies (run once; the text files are committed).

- ``src/umgclip/annotate/vocab/default.txt``: the 133 COCO panoptic thing+stuff names (cleaned:
  ``wall-other-merged`` -> ``wall``) then the 1000 ImageNet class names, de-duplicated.
- ``src/umgclip/annotate/vocab/imagenet_to_coco.txt``: ImageNet class index -> COCO name for
  classes that are clearly an instance of a COCO category (dog breeds -> dog, ...), so the
  ImageNet tagger can speak COCO where it can.

Usage: ``python benchmarks/make_annotate_vocab.py [COCO_MG_ROOT]``
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from torchvision.models import ResNet50_Weights

from umgclip.annotate.vocab import clean_coco_name
from umgclip.paths import find_coco_mg

OUT = Path(__file__).resolve().parents[1] / "src" / "umgclip" / "annotate" / "vocab"

# Index ranges of the ImageNet-1k taxonomy (WordNet subtrees) that are one COCO category.
RANGES = {"bird": [(7, 24), (80, 100), (127, 146)], "dog": [(151, 268)], "cat": [(281, 285)]}
# Single ImageNet names that are an instance of a COCO category.
NAMES = {
    "bear": ["brown bear", "American black bear", "ice bear", "sloth bear"],
    "zebra": ["zebra"],
    "elephant": ["Indian elephant", "African elephant", "tusker"],
    "sheep": ["ram"],
    "cow": ["ox", "water buffalo", "bison"],
    "horse": ["sorrel"],
    "teddy bear": ["teddy"],
    "airplane": ["airliner", "warplane"],
    "bus": ["school bus", "trolleybus", "minibus"],
    "train": [
        "bullet train",
        "electric locomotive",
        "freight car",
        "steam locomotive",
        "passenger car",
    ],
    "truck": ["trailer truck", "garbage truck", "moving van", "pickup", "tow truck", "fire engine"],
    "car": [
        "beach wagon",
        "cab",
        "convertible",
        "jeep",
        "limousine",
        "minivan",
        "Model T",
        "racer",
        "sports car",
        "police van",
    ],
    "motorcycle": ["moped", "motor scooter"],
    "bicycle": ["bicycle-built-for-two", "mountain bike"],
    "boat": [
        "canoe",
        "catamaran",
        "container ship",
        "fireboat",
        "gondola",
        "lifeboat",
        "liner",
        "pirate",
        "schooner",
        "speedboat",
        "trimaran",
        "yawl",
    ],
    "traffic light": ["traffic light"],
    "umbrella": ["umbrella"],
    "tie": ["Windsor tie", "bow tie"],
    "skis": ["ski"],
    "sports ball": [
        "basketball",
        "croquet ball",
        "golf ball",
        "ping-pong ball",
        "rugby ball",
        "soccer ball",
        "tennis ball",
        "volleyball",
    ],
    "tennis racket": ["racket"],
    "bottle": ["beer bottle", "pill bottle", "pop bottle", "water bottle", "wine bottle"],
    "cup": ["cup", "coffee mug"],
    "spoon": ["wooden spoon"],
    "bowl": ["soup bowl", "mixing bowl"],
    "banana": ["banana"],
    "apple": ["Granny Smith"],
    "orange": ["orange"],
    "broccoli": ["broccoli"],
    "hot dog": ["hotdog"],
    "pizza": ["pizza"],
    "chair": ["barber chair", "folding chair", "rocking chair"],
    "couch": ["studio couch"],
    "potted plant": ["pot"],
    "bed": ["four-poster"],
    "dining table": ["dining table"],
    "toilet": ["toilet seat"],
    "tv": ["television", "monitor", "screen"],
    "laptop": ["laptop", "notebook"],
    "mouse": ["mouse"],
    "remote": ["remote control"],
    "keyboard": ["computer keyboard"],
    "cell phone": ["cellular telephone"],
    "microwave": ["microwave"],
    "toaster": ["toaster"],
    "sink": ["washbasin"],
    "refrigerator": ["refrigerator"],
    "clock": ["analog clock", "digital clock", "wall clock"],
    "vase": ["vase"],
    "hair drier": ["hand blower"],
    "stop sign": ["street sign"],
    "parking meter": ["parking meter"],
    "bench": ["park bench"],
    "backpack": ["backpack"],
    "handbag": ["purse"],
    "person": ["ballplayer", "groom", "scuba diver"],
}


def main(argv: list[str]) -> None:
    root = Path(argv[0]) if argv else find_coco_mg()
    if root is None:
        raise SystemExit("coco_mg not found: pass its path")
    cats = json.loads((root / "annotations" / "panoptic.json").read_text())["categories"]
    coco = [clean_coco_name(c["name"]) for c in sorted(cats, key=lambda c: c["id"])]
    imagenet = list(ResNet50_Weights.IMAGENET1K_V2.meta["categories"])
    names: list[str] = []
    for n in coco + imagenet:
        if n not in names:
            names.append(n)
    (OUT / "default.txt").write_text("\n".join(names) + "\n")

    index = {n: i for i, n in enumerate(imagenet)}
    rows: dict[int, str] = {}
    for target, ranges in RANGES.items():
        for lo, hi in ranges:
            for i in range(lo, hi + 1):
                rows[i] = target
    for target, members in NAMES.items():
        for m in members:
            if m not in index:
                raise SystemExit(f"ImageNet has no class named {m!r}")
            rows[index[m]] = target
    lines = ["# imagenet_index\timagenet_name\tcoco_name"]
    lines += [f"{i}\t{imagenet[i]}\t{rows[i]}" for i in sorted(rows)]
    (OUT / "imagenet_to_coco.txt").write_text("\n".join(lines) + "\n")
    print(f"{len(names)} vocabulary names ({len(coco)} COCO), {len(rows)} ImageNet->COCO rows")


if __name__ == "__main__":
    main(sys.argv[1:])
