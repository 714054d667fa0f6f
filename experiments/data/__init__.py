"""The data side of a run: datasets (:mod:`.datasets`, loaders registered by decorator), the
decoded-tensor cache (:mod:`.tensor_cache`), batch augmentation on the device (:mod:`.augment`) and the
training data module (:mod:`.datamodule`)."""
