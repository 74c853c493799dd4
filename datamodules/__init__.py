"""LightningDataModules: the shape world, mixed streaming webdataset sources, and your own."""
