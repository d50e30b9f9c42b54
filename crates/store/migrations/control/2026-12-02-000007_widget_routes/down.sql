DROP TABLE widget_routes;
