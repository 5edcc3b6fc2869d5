"""The loop from serving back to training: stored completions and the feedback on them."""
