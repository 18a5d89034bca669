"""imer_fast data layer: corpora, file formats, synthetic data, missing-modality protocols,
batching and metrics.

Depends only on numpy, torch and the standard library (never on the compiled extension).

Quick start::

    from imer_fast.data import make_synthetic, make_loader, classification_report

    corpus = make_synthetic("iemocap6", seed=0, scale=0.2, feature_dims=64)
    for epoch in range(2):
        for batch in make_loader(corpus, "train", batch_size=8, shuffle=True,
                                 missing="gcnet:0.3", seed=0, epoch=epoch):
            ...  # batch.features / batch.availability / batch.ground_truth / batch.labels
"""
from .batching import (CLASSIFICATION_PAD_LABEL, REGRESSION_PAD_LABEL, DialogueBatch,
                       DialogueDataset, DialogueItem, PackedBatch, collate_dialogues, make_loader,
                       make_rng, present_modalities)
from .corpus import (MODALITIES, MODALITY_CODES, SPLIT_NAMES, Corpus, Dialogue,
                     assert_corpus_equal, canonical_modality, corpus_differences)
from .formats import (MMSADataset, MMSASplit, read_dialoguegcn, read_gcnet, read_mmsa,
                      write_dialoguegcn, write_gcnet, write_mmsa)
from .metrics import (acc2, acc_k, accuracy, classification_report, confusion_matrix, f1_binary,
                      f1_score, mae, pearson, regression_report, unweighted_accuracy)
from .missing import (FixedAvailability, GCNetMissing, IMDerMissing, MissingProtocol, NoMissing,
                      all_patterns, evaluate_patterns, fixed, gcnet, imder, make_protocol,
                      missing_fraction, pattern_mask, pattern_name)
from .synthetic import (DEFAULT_FEATURE_DIMS, SYNTHETIC_NAMES, make_synthetic, write_synthetic)

__all__ = [
    # corpus
    "MODALITIES", "MODALITY_CODES", "SPLIT_NAMES", "Dialogue", "Corpus", "corpus_differences",
    "assert_corpus_equal", "canonical_modality",
    # formats
    "read_gcnet", "write_gcnet", "read_dialoguegcn", "write_dialoguegcn", "read_mmsa",
    "write_mmsa", "MMSADataset", "MMSASplit",
    # synthetic
    "make_synthetic", "write_synthetic", "SYNTHETIC_NAMES", "DEFAULT_FEATURE_DIMS",
    # missing
    "MissingProtocol", "NoMissing", "GCNetMissing", "IMDerMissing", "FixedAvailability",
    "make_protocol", "gcnet", "imder", "fixed", "all_patterns", "evaluate_patterns",
    "pattern_name", "pattern_mask", "missing_fraction",
    # batching
    "DialogueItem", "DialogueBatch", "PackedBatch", "DialogueDataset", "collate_dialogues",
    "make_loader", "make_rng", "present_modalities", "CLASSIFICATION_PAD_LABEL", "REGRESSION_PAD_LABEL",
    # metrics
    "accuracy", "unweighted_accuracy", "f1_score", "confusion_matrix", "classification_report",
    "acc2", "f1_binary", "acc_k", "mae", "pearson", "regression_report",
]
