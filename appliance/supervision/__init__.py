"""Process supervision of one box: supervisord runs etcd, workers and the
controller; `appliance run` drives it. Serving code lives elsewhere."""
