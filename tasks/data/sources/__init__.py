"""Where tiles come from: the synthetic generator, EuroSAT and Sentinel-2 scenes."""
