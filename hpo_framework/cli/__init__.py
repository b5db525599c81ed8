"""Click adapters only: ``hpo-coordinator`` and ``hpo-inspect`` (``commands``) and the
options and error translation all three commands share (``options``). Imports anything;
nothing imports it but the ``workers`` entry."""
