"""Applications shared by the tests."""
