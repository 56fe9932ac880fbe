"""The 19 subcellular-location classes of the HPA single-cell challenge."""

from __future__ import annotations

CLASS_NAMES: tuple[str, ...] = (
    "Nucleoplasm",
    "Nuclear membrane",
    "Nucleoli",
    "Nucleoli fibrillar center",
    "Nuclear speckles",
    "Nuclear bodies",
    "Endoplasmic reticulum",
    "Golgi apparatus",
    "Intermediate filaments",
    "Actin filaments",
    "Microtubules",
    "Mitotic spindle",
    "Centrosome",
    "Plasma membrane",
    "Mitochondria",
    "Aggresome",
    "Cytosol",
    "Vesicles and punctate cytosolic patterns",
    "Negative",
)
NUM_CLASSES: int = len(CLASS_NAMES)
NEGATIVE: int = 18


def parse_labels(text: str) -> list[int]:
    """Parse a ``|``-separated label string (``"0|5|16"``) into sorted class ids.

    Raises ``ValueError`` naming the offending token for anything outside 0..18.
    """
    out: set[int] = set()
    for tok in str(text).replace(" ", "|").split("|"):
        tok = tok.strip()
        if not tok:
            continue
        try:
            c = int(tok)
        except ValueError:
            raise ValueError(f"label {tok!r} is not an integer class id") from None
        if not 0 <= c < NUM_CLASSES:
            raise ValueError(f"class {c} is outside 0..{NUM_CLASSES - 1}")
        out.add(c)
    return sorted(out)


def format_labels(classes) -> str:
    """Inverse of :func:`parse_labels`: ``[0, 5]`` -> ``"0|5"``."""
    return "|".join(str(int(c)) for c in sorted(set(int(c) for c in classes)))
