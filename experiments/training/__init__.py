"""One run, end to end (:mod:`.pipeline`): the classifier (:mod:`.classifier`), checkpoints that resume
(:mod:`.checkpoints`), preemption (:mod:`.preemption`), epoch timing and the W&B logger."""
