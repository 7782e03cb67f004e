"""The formats written between stages: file names and LoRA input naming (contract), an export's
config (model_spec), insert-lora's manifest (lora_manifest), the processed adapter and its
version (processed_adapter), an export's fingerprint, and outputs written whole or not at all
(fileio). They import no stage; every stage imports them."""
