"""What the accelerator's view reveals, measured: taps on what crossed (`tap`, `views`), the
attacks (`inversion`, `gradients`, `membership`), the privacy-utility study (`study`), the rank
analysis (`rank`), and their figures and tables. Nothing in the core imports this package."""
