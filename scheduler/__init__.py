"""Split plans and the executor that carries one generation across an edge and a cloud process."""
