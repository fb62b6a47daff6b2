"""Understanding adapters: measures on ΔW (measures.py) and a report with plots (report.py)."""

from loralab.analysis.report import analyze

__all__ = ["analyze"]
