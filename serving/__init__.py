"""The BentoML scenario-inference service (issue #5). Never imports torch or lightning."""
