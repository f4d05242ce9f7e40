"""Knowledge distillation: ``tokenmill distill`` trains a smaller student from a teacher (a speculative draft
decoder, or an encoder for the model server). See docs/DISTILL.md."""
