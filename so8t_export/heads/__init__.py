"""The safety and authority heads made useful: trained on a user's labelled data, measured, and put into an
exported GGUF without re-exporting it.

- data.py: the JSONL examples (text or chat messages, with safety and/or authority labels);
- features.py: the final normed hidden state at each example's last prompt token, from the PyTorch reference
  or from llama.cpp running a GGUF;
- fit.py: logistic regression on those features, the metrics, the threshold for a false-positive rate;
- train.py: train-heads and eval-heads;
- set_heads.py: the heads and thresholds of a checkpoint into a GGUF, tensor data untouched;
- plot.py: ROC curves and reliability diagrams.
"""
