"""What a round is: the network of a ticket or a control (branches), one trial, one round of trials,
and the output layout under runs/; verifying and exporting recorded tickets."""
