"""Special token ids of the built-in SentencePiece vocabularies (seqio/T5 convention).

pad = 0 (also SimVLM's decoder BOS), eos = 1, unk = 2, no BOS piece. A module of
constants only, so decoding and the models read them without importing seqio/TF.
Families with another vocabulary (e.g. open_clip's CLIP BPE) carry their own ids
in their config.
"""
PAD_ID, EOS_ID, UNK_ID = 0, 1, 2
