"""Readers and writers of the corpus file formats used by the IMER releases.

* :mod:`~imer_fast.data.formats.gcnet`: GCNet / FedDISC label pickle + per-utterance ``.npy`` files.
* :mod:`~imer_fast.data.formats.dialoguegcn`: DialogueGCN / MMGCN ``IEMOCAP_features.pkl``
  (9-tuple and 12-tuple RoBERTa variant).
* :mod:`~imer_fast.data.formats.mmsa`: MMSA ``aligned_50.pkl`` / ``unaligned_50.pkl``.

Every writer returns a dict of paths that can be passed back to its reader as keyword arguments.
"""
from .dialoguegcn import (DIALOGUEGCN_DIMS, DIALOGUEGCN_FIELDS_9, DIALOGUEGCN_FIELDS_12,
                          read_dialoguegcn, write_dialoguegcn)
from .gcnet import (GCNET_DEFAULT_DIMS, GCNET_LABEL_FIELDS_6, GCNET_LABEL_FIELDS_7,
                    load_utterance_feature, read_gcnet, write_gcnet)
from .mmsa import MMSA_DIMS, MMSADataset, MMSASplit, read_mmsa, write_mmsa

__all__ = [
    "read_gcnet", "write_gcnet", "load_utterance_feature", "GCNET_DEFAULT_DIMS",
    "GCNET_LABEL_FIELDS_6", "GCNET_LABEL_FIELDS_7",
    "read_dialoguegcn", "write_dialoguegcn", "DIALOGUEGCN_FIELDS_9", "DIALOGUEGCN_FIELDS_12",
    "DIALOGUEGCN_DIMS",
    "MMSADataset", "MMSASplit", "read_mmsa", "write_mmsa", "MMSA_DIMS",
]
