"""The detector's pieces (method B): backbone, data, pretraining, tuning, report and `ms2rgb detect`."""
