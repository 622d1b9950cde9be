"""Caption metrics with pycocoevalcap: BLEU-1..4, METEOR, ROUGE-L, CIDEr, and SPICE when it can run.

References and candidates go through the PTB tokenizer first (as the COCO evaluation server does; Java needed).
SPICE needs Stanford CoreNLP jars that pycocoevalcap downloads on first use; without them (no network, or no
Java) it is reported as unavailable with the reason, never as a score of 0.
"""
from __future__ import annotations

import shutil
from pathlib import Path
from typing import Hashable, Mapping, Sequence

from pycocoevalcap.bleu.bleu import Bleu
from pycocoevalcap.cider.cider import Cider
from pycocoevalcap.meteor.meteor import Meteor
from pycocoevalcap.rouge.rouge import Rouge
from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

CORENLP_JARS = ("stanford-corenlp-3.6.0.jar", "stanford-corenlp-3.6.0-models.jar")


def java_missing() -> str | None:
    """Why the Java-based scorers cannot run, or None."""
    if shutil.which("java") is None:
        return ("no 'java' on PATH: the PTB tokenizer, METEOR and SPICE need a Java runtime "
                "(apt-get install -y default-jre-headless)")
    return None


def spice_unavailable() -> str | None:
    """Why SPICE cannot run here, or None when it can."""
    import pycocoevalcap.spice

    lib = Path(pycocoevalcap.spice.__file__).parent / "lib"
    missing = [jar for jar in CORENLP_JARS if not (lib / jar).is_file()]
    if missing:
        return (f"SPICE needs {', '.join(missing)} in {lib} (pycocoevalcap downloads them on first use: run "
                "python -c 'from pycocoevalcap.spice.get_stanford_models import get_stanford_models; "
                "get_stanford_models()' once with network access)")
    return java_missing()


def ptb_tokenize(captions: Mapping[Hashable, Sequence[str]]) -> dict[Hashable, list[str]]:
    """PTB-tokenised, lower-cased captions with punctuation removed (pycocoevalcap's tokenizer)."""
    return PTBTokenizer().tokenize({k: [{"caption": c} for c in v] for k, v in captions.items()})


def caption_metrics(references: Mapping[Hashable, Sequence[str]], candidates: Mapping[Hashable, str],
                    spice: bool = True) -> tuple[dict[str, float], str | None]:
    """``bleu_1``…``bleu_4``, ``meteor``, ``rouge_l``, ``cider`` (and ``spice``) of one candidate per image against
    its references, on the 0–1 scale of pycocoevalcap; returns ``(metrics, why SPICE is missing or None)``."""
    if set(references) != set(candidates):
        raise ValueError(f"references and candidates must cover the same images ({len(references)} vs "
                         f"{len(candidates)} ids)")
    missing_java = java_missing()
    if missing_java:
        raise RuntimeError(missing_java)
    gts = ptb_tokenize(references)
    res = ptb_tokenize({k: [c] for k, c in candidates.items()})
    metrics: dict[str, float] = {}
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    metrics |= {f"bleu_{n + 1}": float(s) for n, s in enumerate(bleu)}
    metrics["meteor"] = float(Meteor().compute_score(gts, res)[0])
    metrics["rouge_l"] = float(Rouge().compute_score(gts, res)[0])
    metrics["cider"] = float(Cider().compute_score(gts, res)[0])
    why = spice_unavailable() if spice else "SPICE not requested"
    if why is None:
        from pycocoevalcap.spice.spice import Spice

        metrics["spice"] = float(Spice().compute_score(gts, res)[0])
    return metrics, why


def constant_caption_cider(references: Mapping[Hashable, Sequence[str]], caption: str) -> float:
    """CIDEr of predicting ``caption`` for every image (the trivial baseline)."""
    gts = ptb_tokenize(references)
    res = ptb_tokenize({k: [caption] for k in references})
    return float(Cider().compute_score(gts, res)[0])
