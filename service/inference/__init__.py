"""Inference: admission, deadlines, preprocessing and dynamic batching, owned by the predictor."""
