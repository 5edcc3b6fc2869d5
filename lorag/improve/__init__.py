"""The loop's steps that need the running server: sampled and teacher answers, the domain's guards,
graders, training files made from traffic, and the gate a fine-tuned adapter passes to go live."""
