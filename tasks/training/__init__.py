"""The training layer: loops, model files, progress, metrics and plots shared by the stages."""
