"""Applying the trained models to new imagery: `ms2rgb predict` (scene-class maps with the RGB student)."""
