"""Privacy accounting: Opacus's accountants, noise calibration and the privacy ledger
(`accountant`), and the bookkeeping of which private data each release belongs to (`loaders`)."""
