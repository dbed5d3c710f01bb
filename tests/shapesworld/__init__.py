"""Tests of the ShapesWorld lab (itm_engine/shapesworld/): the generator, its tasks, pretraining, the
bundled model and the demo."""
