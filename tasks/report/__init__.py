"""The evaluation report: figures (PNG) and one self-contained HTML page built from reports/*.json."""
