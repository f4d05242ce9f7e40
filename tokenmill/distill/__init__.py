"""Knowledge distillation: ``tokenmill distill`` trains a smaller student from a teacher (a speculative draft
decoder, an EAGLE draft head, or an encoder for the model server). See docs/DISTILL.md."""
