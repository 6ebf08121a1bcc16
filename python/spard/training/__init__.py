"""The training infrastructure under the loop of ``spard.trainer``: what every run needs whatever
its defense, kept apart from the methods (``spard.spag``, ``spard.select``, ``spard.defenses``).

- ``runfolder``: output folders, checked before the expensive work, owned by one run;
- ``claims``: claims on shared work, so workers on one folder never run the same item twice;
- ``guards``: a non-finite loss, and rows that carry no loss;
- ``preflight``: cheap checks of input sources before data or models are loaded;
- ``precision``: base weights in the model's dtype, trainable weights and optimizer state in fp32;
- ``checkpoint``: a seeded data order, RNG states, atomic checkpoint folders, bitwise resume;
- ``batches``: global batches split into this rank's micro-batches.
"""
