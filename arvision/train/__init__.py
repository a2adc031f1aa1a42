"""Training: the one prior training loop (:mod:`arvision.train.loop`), the tokenizer trainer,
and the Ray glue (:mod:`arvision.train.ray`). Import the submodules directly."""
