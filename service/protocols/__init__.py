"""Wire protocols: each turns requests of its protocol into calls on the predictor, and the results back."""
