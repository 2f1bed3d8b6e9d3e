"""Long-context training pieces for LongLoRA (issue 18): position interpolation here, shifted sparse
attention in lorakit.train.s2_attention."""
