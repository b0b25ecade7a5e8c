"""How far an exported model may disagree with its source: one table, read by the export's
parity check, its --help and the nightly job's backend choice. Pure data, no imports of torch."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Tolerance:
    """How far an export may disagree with its source on held-out photos."""

    min_top1_agreement: float  # share of photos with the same top-1 class
    max_logit_error: float  # largest |logit difference| over every photo and class
    # Largest drop in top-1 accuracy (a share) where the photos are labelled.
    max_accuracy_drop: float = 1.0

    def misses(self, agreement: float, logit_error: float,
               accuracy_drop: float | None = None) -> list[str]:
        """What a measured parity misses of this tolerance (empty: within it)."""
        problems = []
        if not agreement >= self.min_top1_agreement:
            problems.append(f"top-1 agreement {agreement:.4f} < min_top1_agreement "
                            f"{self.min_top1_agreement}")
        if not logit_error <= self.max_logit_error:  # also catches NaN
            problems.append(f"max logit error {logit_error:.6g} > max_logit_error "
                            f"{self.max_logit_error}")
        if accuracy_drop is not None and not accuracy_drop <= self.max_accuracy_drop:
            problems.append(f"top-1 accuracy drop {accuracy_drop:.4f} > max_accuracy_drop "
                            f"{self.max_accuracy_drop}")
        return problems


# fp32 ONNX is the same arithmetic in another order: float rounding only. fp16 keeps ~3
# significant digits of each activation. int8 rounds every weight and activation to 256 levels:
# photos near a decision boundary flip. Its bound is set so that the format the export uses
# passes on every x86-64 CPU while a saturating one (U8S8 with full-range weights on AVX2 without
# VNNI) or a broken export (wrong ranges, a wrong input layout) is refused (BENCHMARKS.md,
# "int8 on every CPU").
TOLERANCES = {
    "onnx": Tolerance(min_top1_agreement=1.0, max_logit_error=1e-3),
    "onnx-fp16": Tolerance(min_top1_agreement=0.99, max_logit_error=0.1),
    "onnx-int8": Tolerance(min_top1_agreement=0.93, max_logit_error=3.0, max_accuracy_drop=0.03),
}
