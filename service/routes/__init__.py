"""The service's routes, one ``APIRouter`` per resource; ``service.app.create_app`` includes them."""
